//! Knowledge distillation as DeiT trains (Touvron et al. 2021, `losses.py`): a teacher
//! model, run in evaluation mode without gradients on the student's augmented batch, and
//! the loss that mixes the usual cross-entropy of the class head with a distillation term
//! on the distillation head: the teacher's argmax as a hard label, or the KL divergence
//! to its softened distribution.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::data::{DataLoader, Images, LoaderConfig};
use crate::dist::Collective;
use crate::models::{Architecture, Classifier, ModelConfig};
use crate::predict::load_model;
use crate::weights::{resample, Arch, FitOptions};
use crate::{ops, Error, Result};

/// What the distillation head learns from the teacher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DistillKind {
    /// Cross-entropy against the teacher's top class (DeiT's default, "hard-label").
    #[default]
    Hard,
    /// KL divergence to the teacher's softmax at temperature τ, times τ².
    Soft,
}

/// The distillation settings of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Distill {
    pub kind: DistillKind,
    /// Weight of the distillation term; the class head's cross-entropy gets 1 − α.
    pub alpha: f64,
    /// Temperature of the soft targets.
    pub tau: f64,
}

/// DeiT's `DistillationLoss`: `(1 − α)·CE(cls, y; smoothing) + α·D`, where D is
/// `CE(dist, argmax teacher)` (hard) or `KL(softmax(teacher/τ) ‖ softmax(dist/τ))·τ² / (B·K)`
/// summed over the batch (soft, DeiT's normalisation). `cls`, `dist` and `teacher` are
/// (B, K) logits, `y` (B,) labels. The teacher's logits carry no gradient.
pub fn distillation_loss(
    cls: &Tensor,
    dist: &Tensor,
    y: &Tensor,
    teacher: &Tensor,
    smoothing: f64,
    d: &Distill,
) -> Result<Tensor> {
    let base = ops::cross_entropy(cls, y, smoothing)?;
    let teacher = teacher.detach();
    let term = match d.kind {
        DistillKind::Hard => {
            let target = teacher.argmax(D::Minus1)?; // (B,) u32
            ops::cross_entropy(dist, &target, 0.0)?
        }
        DistillKind::Soft => {
            let t = d.tau;
            let log_p = ops::log_softmax_last_dim(&(dist / t)?)?; // student, (B, K)
            let log_q = ops::log_softmax_last_dim(&(teacher / t)?)?; // teacher
            let kl = (log_q.exp()? * (log_q - log_p)?)?.sum_all()?;
            (kl * (t * t / dist.elem_count() as f64))?
        }
    };
    // Weighted through a tensor product, not `* α`: candle drops a scaling by 0 from the
    // graph, and with α = 0 (or 1) a head must still get its (zero) gradient, as in PyTorch.
    let weight = |t: Tensor, w: f64| -> Result<Tensor> {
        Ok(t.broadcast_mul(&Tensor::new(w as f32, t.device())?)?)
    };
    Ok((weight(base, 1.0 - d.alpha)? + weight(term, d.alpha)?)?)
}

/// A trained model that labels the student's batches: loaded from any checkpoint the tool
/// reads, with the same classes as the student; the student's normalised batch is brought
/// to the teacher's normalisation, channels (gray replicated to RGB) and input size.
#[derive(Debug)]
pub struct Teacher {
    model: Box<dyn Classifier>,
    config: ModelConfig,
    /// Per teacher channel: the pixel in [0, 1] = x · `std` + `mean` of the student's.
    student_mean: Vec<f32>,
    student_std: Vec<f32>,
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Teacher {
    /// Loads the teacher at `path` for a student with config `student` whose inputs are
    /// normalised with `mean` and `std`.
    pub fn load(
        path: &Path,
        student: &ModelConfig,
        mean: &[f32],
        std: &[f32],
        dev: &Device,
    ) -> Result<Teacher> {
        let (model, fitted) = load_model(path, &Arch::FromCheckpoint, FitOptions::default(), dev)?;
        let config = fitted.config;
        let bad = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        if config.num_classes() != student.num_classes() {
            return Err(bad(format!(
                "the teacher has {} classes but the student {}",
                config.num_classes(),
                student.num_classes()
            )));
        }
        let (cs, ct) = (student.in_channels(), config.in_channels());
        if cs != ct && !(cs == 1 && ct == 3) {
            return Err(bad(format!(
                "the teacher takes {ct}-channel images, the student {cs}: only gray to RGB \
                 is converted"
            )));
        }
        let p = fitted
            .checkpoint
            .preprocess
            .clone()
            .unwrap_or_else(|| config.default_preprocess());
        let pick = |v: &[f32], c: usize| v[if v.len() == 1 { 0 } else { c }];
        Ok(Teacher {
            model,
            student_mean: (0..ct).map(|c| pick(mean, c)).collect(),
            student_std: (0..ct).map(|c| pick(std, c)).collect(),
            mean: p.mean,
            std: p.std,
            config,
        })
    }

    /// The teacher's logits (B, K) for the student's batch `x` (B, C, H, W), in
    /// evaluation mode, without gradient.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.logits_in(x, &super::step::Shards::whole(x.device(), x.dim(0)?))
    }

    /// [`Teacher::logits`] of this process's samples of a micro-batch split as `shards`,
    /// run shard by shard (the same pieces, so the same numbers, as one process alone).
    pub fn logits_in(&self, x: &Tensor, shards: &super::step::Shards) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let ct = self.config.in_channels();
        let x = if c == 1 && ct == 3 {
            x.repeat((1, 3, 1, 1))?
        } else {
            x.clone()
        };
        // x_teacher = (x · std_s + mean_s − mean_t) / std_t, per channel.
        let per = |v: Vec<f32>| Tensor::from_vec(v, (1, ct, 1, 1), x.device());
        let scale = per((0..ct).map(|i| self.student_std[i] / self.std[i]).collect())?;
        let shift = per((0..ct)
            .map(|i| (self.student_mean[i] - self.mean[i]) / self.std[i])
            .collect())?;
        let x = x.broadcast_mul(&scale)?.broadcast_add(&shift)?;
        let [th, tw] = self.config.image_size();
        let x = if (th, tw) == (h, w) {
            x
        } else {
            let flat = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let resized = resample::resize(
                &flat,
                b * ct,
                h,
                w,
                th,
                tw,
                resample::Interpolation::Bilinear,
                true,
            )
            .map_err(Error::Invalid)?;
            Tensor::from_vec(resized, (b, ct, th, tw), x.device())?
        };
        let bounds = shards.local_bounds();
        Ok(super::step::forward_in(self.model.as_ref(), &x, &bounds)?.detach())
    }
}

/// The teacher's logits for every training image, computed once before the first epoch on
/// the images as evaluation sees them (no augmentation), and read by index at every step
/// instead of running the teacher on the augmented batch (`teacher_cache`). One teacher
/// pass in all instead of one per epoch; the student's crop and the view the teacher
/// labelled differ by the augmentation, so it suits mild augmentation (small shifts,
/// flips) best. The same logits on every process: each labels its share of the batches,
/// then all are summed (the other rows are zeros).
#[derive(Debug, Clone)]
pub struct TeacherCache {
    /// (N, K), row i for training image i.
    logits: Vec<f32>,
    classes: usize,
}

impl TeacherCache {
    /// The most logits a cache holds (1 GiB of f32); a larger one is refused (the teacher
    /// can still run on each batch).
    pub const MAX_VALUES: usize = 1 << 28;

    /// Runs `teacher` over `images` loaded with `config` (an evaluation loader: no
    /// shuffling, no augmentation).
    pub fn build(
        teacher: &Teacher,
        images: &Images,
        config: LoaderConfig,
        dev: &Device,
        world: &dyn Collective,
    ) -> Result<TeacherCache> {
        let classes = teacher.config.num_classes();
        let values = images.len().saturating_mul(classes);
        if values > Self::MAX_VALUES {
            return Err(Error::Config(format!(
                "teacher_cache would hold {} images × {classes} classes of logits ({:.1} GiB, \
                 at most {} GiB): train without it (the teacher then runs on each batch)",
                images.len(),
                values as f64 * 4.0 / (1u64 << 30) as f64,
                (Self::MAX_VALUES * 4) >> 30
            )));
        }
        let mut logits = vec![0f32; values];
        let loader = DataLoader::new(images.clone(), config)?;
        for batch in loader.epoch_strided(0, world.rank(), world.size())? {
            let batch = batch?;
            let x = Tensor::from_vec(batch.images, batch.shape.to_vec(), dev)?;
            let rows = teacher.logits(&x)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (&i, row) in batch.indices.iter().zip(rows) {
                logits[i * classes..(i + 1) * classes].copy_from_slice(&row);
            }
        }
        world.sum_f32(&mut logits)?;
        if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
            return Err(Error::Numeric(format!(
                "the teacher's logits for training image {} are not finite",
                i / classes
            )));
        }
        Ok(TeacherCache { logits, classes })
    }

    /// The cached logits (b, K) of the training images `indices`.
    pub fn rows(&self, indices: &[usize], dev: &Device) -> Result<Tensor> {
        let k = self.classes;
        let mut out = Vec::with_capacity(indices.len() * k);
        for &i in indices {
            let row = self.logits.get(i * k..(i + 1) * k).ok_or_else(|| {
                Error::Invalid(format!("training image {i} is not in the teacher's cache"))
            })?;
            out.extend_from_slice(row);
        }
        Ok(Tensor::from_vec(out, (indices.len(), k), dev)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn scalar(x: &Tensor) -> f64 {
        x.to_scalar::<f32>().unwrap() as f64
    }

    /// Cross-entropy of one row of logits against class `k`, by hand.
    fn ce(row: &[f64], k: usize) -> f64 {
        let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
        lse - row[k]
    }

    #[test]
    fn hard_and_soft_losses_equal_the_hand_computed_values() {
        let cls = [[1.0, 0.0, -1.0], [0.5, 0.25, 0.0]];
        let dist = [[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]];
        let teacher = [[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]]; // argmax: 1, 0
        let flat = |a: [[f64; 3]; 2]| a.iter().flatten().map(|&v| v as f32).collect::<Vec<_>>();
        let y = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        let (tc, td, tt) = (
            t(&flat(cls), (2, 3)),
            t(&flat(dist), (2, 3)),
            t(&flat(teacher), (2, 3)),
        );
        let base = (ce(&cls[0], 0) + ce(&cls[1], 2)) / 2.0;

        let hard = Distill {
            kind: DistillKind::Hard,
            alpha: 0.25,
            tau: 1.0,
        };
        let got = scalar(&distillation_loss(&tc, &td, &y, &tt, 0.0, &hard).unwrap());
        let term = (ce(&dist[0], 1) + ce(&dist[1], 0)) / 2.0;
        assert!((got - (0.75 * base + 0.25 * term)).abs() < 1e-5, "{got}");

        let soft = Distill {
            kind: DistillKind::Soft,
            alpha: 0.5,
            tau: 2.0,
        };
        let got = scalar(&distillation_loss(&tc, &td, &y, &tt, 0.0, &soft).unwrap());
        let log_softmax = |row: &[f64]| {
            let z: Vec<f64> = row.iter().map(|v| v / 2.0).collect();
            let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
            z.iter().map(|v| v - lse).collect::<Vec<_>>()
        };
        let mut kl = 0.0;
        for r in 0..2 {
            let (p, q) = (log_softmax(&dist[r]), log_softmax(&teacher[r]));
            kl += (0..3).map(|k| q[k].exp() * (q[k] - p[k])).sum::<f64>();
        }
        let term = kl * 4.0 / 6.0;
        assert!((got - (0.5 * base + 0.5 * term)).abs() < 1e-5, "{got}");
    }

    #[test]
    fn the_loss_sends_no_gradient_to_the_teacher_and_some_to_both_heads() {
        let v = |x: &[f32]| candle_core::Var::from_tensor(&t(x, (1, 3))).unwrap();
        let (cls, dist, teacher) = (v(&[1., 0., 0.]), v(&[0., 1., 0.]), v(&[0., 0., 5.]));
        let y = Tensor::new(&[0u32], &Device::Cpu).unwrap();
        for kind in [DistillKind::Hard, DistillKind::Soft] {
            let d = Distill {
                kind,
                alpha: 0.5,
                tau: 3.0,
            };
            let loss = distillation_loss(
                cls.as_tensor(),
                dist.as_tensor(),
                &y,
                teacher.as_tensor(),
                0.1,
                &d,
            )
            .unwrap();
            let grads = loss.backward().unwrap();
            assert!(grads.get(teacher.as_tensor()).is_none(), "{kind:?}");
            for head in [&cls, &dist] {
                let g = grads.get(head.as_tensor()).unwrap();
                assert!(
                    scalar(&g.abs().unwrap().sum_all().unwrap()) > 0.0,
                    "{kind:?}"
                );
            }
        }
    }

    /// A saved RGB teacher of `size` px, normalised with mean and std 0.5.
    fn saved_teacher(dir: &Path, size: usize) -> (std::path::PathBuf, ModelConfig) {
        let cfg = ModelConfig::Vit(crate::models::ViTConfig {
            num_classes: 3,
            ..crate::models::ViTConfig::timm(size, 8, 16, 1, 2)
        });
        let tensors = cfg
            .init_params(5, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
        let path = dir.join(format!("teacher{size}.safetensors"));
        let pre = crate::models::Preprocess::vit_default(3);
        let meta = crate::weights::SaveMeta {
            config: Some(&cfg),
            preprocess: Some(&pre),
            class_names: None,
            extra: vec![],
        };
        crate::weights::save(&path, &tensors, &Default::default(), &meta).unwrap();
        (path, cfg)
    }

    /// A gray 16 px ViT student of `classes` classes.
    fn gray_student(classes: usize) -> ModelConfig {
        ModelConfig::Vit(crate::models::ViTConfig {
            in_channels: 1,
            num_classes: classes,
            ..crate::models::ViTConfig::timm(16, 8, 16, 1, 2)
        })
    }

    #[test]
    fn the_cache_holds_the_teachers_logits_of_each_unaugmented_training_image() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let student = gray_student(3);
        let (path, _) = saved_teacher(dir.path(), 16);
        let teacher = Teacher::load(&path, &student, &[0.2], &[0.25], &dev).unwrap();
        // 7 gray 16 px images, image i a ramp scaled by i; batches of 3 (the last short).
        let n = 7;
        let pixels = (0..n)
            .flat_map(|i| (0..256).map(move |p| ((p * (i + 1)) % 256) as u8))
            .collect();
        let labels = (0..n).map(|i| (i % 3) as u32).collect();
        let names = (0..3).map(|c| format!("c{c}")).collect();
        let images: Images = crate::data::Dataset::new(pixels, labels, 1, 16, 16, names)
            .unwrap()
            .into();
        let config = LoaderConfig::eval(3, vec![0.2], vec![0.25]);
        let cache =
            TeacherCache::build(&teacher, &images, config, &dev, &crate::dist::Single).unwrap();
        // Rows asked in any order are the teacher's logits of those images, unaugmented.
        let all = DataLoader::new(images.clone(), LoaderConfig::eval(n, vec![0.2], vec![0.25]))
            .unwrap()
            .epoch(0)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let x = Tensor::from_vec(all.images, all.shape.to_vec(), &dev).unwrap();
        let want = teacher.logits(&x).unwrap();
        let order = [6usize, 0, 3, 3, 5];
        let got = cache.rows(&order, &dev).unwrap();
        let idx = Tensor::new(&order.map(|i| i as u32), &dev).unwrap();
        let want = want.index_select(&idx, 0).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        // An image the cache has not seen is an error, not a panic.
        let e = cache.rows(&[7], &dev).unwrap_err();
        assert!(e.to_string().contains("training image 7"), "{e}");
    }

    #[test]
    fn the_teacher_sees_the_batch_in_its_own_normalisation_channels_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        // A gray 16 px student normalised with mean 0.2, std 0.25; a uniform gray batch
        // of pixel value 0.7 is x = 2 everywhere.
        let student = gray_student(3);
        let x = Tensor::full(2f32, (2, 1, 16, 16), &dev).unwrap();
        for size in [16, 32] {
            let (path, cfg) = saved_teacher(dir.path(), size);
            let teacher = Teacher::load(&path, &student, &[0.2], &[0.25], &dev).unwrap();
            let got = teacher.logits(&x).unwrap();
            // What the teacher itself gives the same picture: RGB 0.7 everywhere at its size,
            // normalised with 0.5 / 0.5 (0.4).
            let (model, _) =
                load_model(&path, &Arch::FromCheckpoint, FitOptions::default(), &dev).unwrap();
            let want_x = Tensor::full(0.4f32, (2, 3, size, size), &dev).unwrap();
            let want = model.forward(&want_x).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-4, "size {size}");
            assert_eq!(cfg.num_classes(), 3);
        }
        // Another class count: refused, naming both.
        let other = gray_student(5);
        let (path, _) = saved_teacher(dir.path(), 16);
        let e = Teacher::load(&path, &other, &[0.2], &[0.25], &dev).unwrap_err();
        assert!(e.to_string().contains("3 classes but the student 5"), "{e}");
    }
}
