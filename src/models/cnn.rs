//! The reference documents' SimpleCNN, the baseline a ViT is compared with: stages of a
//! 3×3 convolution (padding 1) and ReLU, each but the last followed by a 2×2 max-pool;
//! global average pooling; a linear classifier. Parameter names are the PyTorch module's
//! (`features.{0,3,6,9}`, `classifier`), so its `state_dict` loads unchanged.

use candle_core::{Device, Tensor, D};
use candle_nn::VarBuilder;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::layers::{Linear, Mode};
use super::vit::check_indices;
use super::{Architecture, Classifier, Intermediates, ModelConfig, Preprocess, Preset};
use crate::{Error, Result};

fn default_widths() -> Vec<usize> {
    vec![64, 128, 256, 512]
}

/// A SimpleCNN: input size and channels, classes, and the width of each stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CnnConfig {
    /// Input size as [height, width] in pixels.
    pub image_size: [usize; 2],
    /// Input channels: 3 for RGB, 1 for grayscale. Default 3.
    #[serde(default = "super::default_channels")]
    pub in_channels: usize,
    /// Classes of the linear classifier.
    pub num_classes: usize,
    /// Output channels of each convolution stage. Default 64, 128, 256, 512.
    #[serde(default = "default_widths")]
    pub widths: Vec<usize>,
}

/// Our SimpleCNN presets.
pub const PRESETS: &[Preset<CnnConfig>] = &[
    // The documents' SimpleCNN on CIFAR-10 (32×32×3): 1,556,106 parameters.
    Preset {
        name: "cnn_simple",
        config: || CnnConfig {
            image_size: [32, 32],
            in_channels: 3,
            num_classes: 10,
            widths: default_widths(),
        },
        pretrained: |c| Preprocess::vit_default(c.in_channels),
    },
    // The same for Fashion-MNIST / MNIST (28×28×1).
    Preset {
        name: "cnn_simple_fmnist",
        config: || CnnConfig {
            image_size: [28, 28],
            in_channels: 1,
            num_classes: 10,
            widths: default_widths(),
        },
        pretrained: |c| Preprocess::vit_default(c.in_channels),
    },
];

impl CnnConfig {
    /// The spatial size after each stage: halved (floor) by every pool but the last.
    fn stage_sizes(&self) -> Vec<(usize, usize)> {
        let [mut h, mut w] = self.image_size;
        let mut out = Vec::new();
        for i in 0..self.widths.len() {
            out.push((h, w));
            if i + 1 < self.widths.len() {
                (h, w) = (h / 2, w / 2);
            }
        }
        out
    }

    /// `features.{3i}`: the index of stage i's convolution in PyTorch's `nn.Sequential`
    /// (convolution, ReLU, pool per stage).
    fn conv_name(i: usize) -> String {
        format!("features.{}", 3 * i)
    }
}

impl Architecture for CnnConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let [h, w] = self.image_size;
        let stages = self.widths.len();
        if !(1..=8).contains(&stages) {
            return bad(format!("widths must list 1 to 8 stages, got {stages}"));
        }
        if let Some(&c) = self.widths.iter().find(|&&c| c == 0 || c > 1 << 13) {
            return bad(format!("each width must be in 1..=8192, got {c}"));
        }
        if !(1..=1 << 10).contains(&self.in_channels) {
            return bad(format!(
                "in_channels must be in 1..=1024, got {}",
                self.in_channels
            ));
        }
        if !(1..=1 << 20).contains(&self.num_classes) {
            return bad(format!(
                "num_classes must be in 1..=1048576, got {}",
                self.num_classes
            ));
        }
        let least = 1usize << (stages - 1);
        if h < least || w < least || h > 1 << 14 || w > 1 << 14 {
            return bad(format!(
                "image_size {h}x{w} must be between {least} (one pixel left after {} pools) \
                 and 16384 a side",
                stages - 1
            ));
        }
        Ok(())
    }
    super::input_and_classes_fields!();
    fn set_drop_path(&mut self, _rate: f64) {}
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut p = Vec::new();
        let mut c = self.in_channels;
        for (i, &w) in self.widths.iter().enumerate() {
            p.push((format!("{}.weight", Self::conv_name(i)), vec![w, c, 3, 3]));
            p.push((format!("{}.bias", Self::conv_name(i)), vec![w]));
            c = w;
        }
        p.push(("classifier.weight".into(), vec![self.num_classes, c]));
        p.push(("classifier.bias".into(), vec![self.num_classes]));
        p
    }
    fn head_names(&self) -> Vec<&'static str> {
        vec!["classifier"]
    }
    fn depth(&self) -> usize {
        self.widths.len()
    }
    fn flops(&self) -> u64 {
        let mut c = self.in_channels as u64;
        let mut total = 0u64;
        for (&w, (h, wd)) in self.widths.iter().zip(self.stage_sizes()) {
            let out = (h * wd) as u64 * w as u64;
            total = total.saturating_add(out.saturating_mul(2 * 9 * c));
            c = w as u64;
        }
        total.saturating_add(2 * c * self.num_classes as u64)
    }
    fn shape_flow(&self) -> Vec<(String, Vec<usize>)> {
        let [h, w] = self.image_size;
        let mut flow = vec![("image".to_string(), vec![self.in_channels, h, w])];
        let last = self.widths.len() - 1;
        for (i, (&c, (sh, sw))) in self.widths.iter().zip(self.stage_sizes()).enumerate() {
            flow.push((format!("conv 3x3 + ReLU, stage {}", i + 1), vec![c, sh, sw]));
            if i < last {
                flow.push(("max-pool 2x2".into(), vec![c, sh / 2, sw / 2]));
            }
        }
        flow.push(("global average pool".into(), vec![self.widths[last]]));
        flow.push(("classifier: logits".into(), vec![self.num_classes]));
        flow
    }
    fn default_preprocess(&self) -> Preprocess {
        Preprocess::vit_default(self.in_channels)
    }
    /// PyTorch's defaults for `Conv2d` and `Linear` (weights and biases uniform in
    /// ±1/√fan_in), from ChaCha8 seeded with `seed`.
    fn init_params(&self, seed: u64, dev: &Device) -> Result<Vec<(String, Tensor)>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        let shapes = self.param_shapes();
        for (name, shape) in shapes.iter() {
            // fan_in of the layer the tensor belongs to (a bias takes its weight's).
            let weight = shapes
                .iter()
                .find(|(n, _)| *n == name.replace(".bias", ".weight"))
                .map_or(shape, |(_, s)| s);
            let fan_in: usize = weight[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
                .collect();
            out.push((name.clone(), Tensor::from_vec(values, shape.clone(), dev)?));
        }
        Ok(out)
    }
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Classifier>> {
        Ok(Box::new(SimpleCnn::new(self, vb)?))
    }
}

/// One stage: 3×3 convolution with padding 1, ReLU.
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor, // (C_out, C_in, 3, 3)
    bias: Tensor,   // (C_out,)
}

impl Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = crate::ops::conv2d(x, &self.weight, 1, 1)?; // (B, C_out, H, W)
        let b = self.bias.reshape((1, self.bias.dim(0)?, 1, 1))?;
        crate::ops::relu(&y.broadcast_add(&b)?)
    }
}

/// The network of a [`CnnConfig`].
#[derive(Debug, Clone)]
pub struct SimpleCnn {
    cfg: CnnConfig,
    stages: Vec<Conv>,
    classifier: Linear,
}

impl SimpleCnn {
    pub fn new(cfg: &CnnConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let mut stages = Vec::new();
        let mut c = cfg.in_channels;
        for (i, &w) in cfg.widths.iter().enumerate() {
            let v = vb.pp(CnnConfig::conv_name(i));
            stages.push(Conv {
                weight: v.get((w, c, 3, 3), "weight")?,
                bias: v.get(w, "bias")?,
            });
            c = w;
        }
        let classifier = Linear::new(&vb.pp("classifier"), cfg.num_classes, c, true)?;
        Ok(SimpleCnn {
            cfg: cfg.clone(),
            stages,
            classifier,
        })
    }

    /// Stage `i` on `x`: convolution and ReLU, then the pool unless it is the last.
    fn stage(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        let y = self.stages[i].forward(x)?;
        if i + 1 < self.stages.len() {
            Ok(y.max_pool2d(2)?) // (B, C, H/2, W/2)
        } else {
            Ok(y)
        }
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        super::check_images(x, &self.cfg)
    }
}

impl Classifier for SimpleCnn {
    fn config(&self) -> ModelConfig {
        ModelConfig::Cnn(self.cfg.clone())
    }

    /// Images → the last stage's feature map (B, C, h, w).
    fn forward_features_t(&self, x: &Tensor, _mode: &mut Mode) -> Result<Tensor> {
        self.check_input(x)?;
        let mut x = x.clone();
        for i in 0..self.stages.len() {
            x = self.stage(i, &x)?;
        }
        Ok(x)
    }

    /// Feature map (B, C, h, w) → global average pool (B, C) → logits (B, classes).
    fn forward_head_t(&self, feats: &Tensor, _mode: &mut Mode) -> Result<Tensor> {
        let pooled = feats.flatten_from(2)?.mean(D::Minus1)?; // (B, C)
        self.classifier.forward(&pooled)
    }

    /// Logits and the outputs of the stages listed in `indices`; no attention.
    fn forward_intermediates(&self, x: &Tensor, indices: &[usize]) -> Result<Intermediates> {
        check_indices(indices, self.stages.len())?;
        self.check_input(x)?;
        let mut outs = Vec::new();
        let mut x = x.clone();
        for i in 0..self.stages.len() {
            x = self.stage(i, &x)?;
            outs.push(x.clone());
        }
        let logits = self.forward_head(&x)?;
        Ok(Intermediates {
            logits,
            blocks: indices.iter().map(|&i| outs[i].clone()).collect(),
            attention: vec![],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;
    use candle_core::DType;

    fn tiny() -> CnnConfig {
        CnnConfig {
            image_size: [9, 10],
            in_channels: 2,
            num_classes: 3,
            widths: vec![4, 5, 6],
        }
    }

    #[test]
    fn the_documents_cnn_has_pytorchs_parameter_count_and_shapes() {
        // SimpleCNN(num_classes=10) in PyTorch: sum(p.numel() for p in m.parameters()).
        let c = ModelConfig::preset("cnn_simple").unwrap();
        assert_eq!(c.num_params(), 1_556_106);
        let t = tiny();
        let flow = t.shape_flow();
        assert_eq!(flow[1].1, vec![4, 9, 10]);
        assert_eq!(flow[2].1, vec![4, 4, 5]);
        assert_eq!(flow.last().unwrap().1, vec![3]);
        assert!(CnnConfig {
            image_size: [3, 3],
            ..tiny()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn every_parameter_receives_a_nonzero_gradient_and_shapes_flow() {
        use candle_nn::VarMap;
        let cfg = tiny();
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        for (name, t) in cfg.init_params(1, &dev).unwrap() {
            let v = candle_core::Var::from_tensor(&t).unwrap();
            varmap.data().lock().unwrap().insert(name, v);
        }
        let m = SimpleCnn::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 2, 9, 10), &dev).unwrap();
        let logits = m.forward(&x).unwrap();
        assert_eq!(logits.dims(), &[4, 3]);
        let taken = m.forward_intermediates(&x, &[0, 2]).unwrap();
        assert_eq!(taken.blocks[0].dims(), &[4, 4, 4, 5]); // after its pool
        assert_eq!(taken.blocks[1].dims(), &[4, 6, 2, 2]);
        assert!(taken.attention.is_empty());
        let y = Tensor::new(&[0u32, 1, 2, 1], &dev).unwrap();
        let grads = ops::cross_entropy(&logits, &y, 0.0)
            .unwrap()
            .backward()
            .unwrap();
        let data = varmap.data().lock().unwrap();
        assert_eq!(data.len(), cfg.param_shapes().len());
        for (name, var) in data.iter() {
            let g = grads.get(var.as_tensor()).unwrap();
            let norm = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{name}: {norm}");
        }
    }
}
