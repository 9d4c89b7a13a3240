//! Data-parallel training over MPI: `mpirun -np 2 vit train …` against one process on tiny
//! generated datasets. Built with the `mpi` feature only (`cargo test --features mpi --test
//! mpi`, which `.ci/run` runs); needs Open MPI's `mpirun` on the PATH.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{ok, p, tiny_recipe, weights, write_idx_dataset};

/// `mpirun -np N vit ARGS` (as root too, where CI runs, and on a machine with fewer cores
/// than N), not yet started. Its processes carry `VIT_TEST_JOB=job` in their environment,
/// to be told from other tests' ([`rank_pid`]).
fn mpirun_job(n: usize, args: &[&str], job: &str) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &n.to_string(), "--oversubscribe"])
        .arg(env!("CARGO_BIN_EXE_vit"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("VIT_TEST_JOB", job);
    c
}

fn mpirun(n: usize, args: &[&str]) -> Command {
    mpirun_job(n, args, "")
}

fn run_mpi(n: usize, args: &[&str]) -> Output {
    mpirun(n, args).output().expect("mpirun runs")
}

fn ok_mpi(n: usize, args: &[&str]) -> String {
    let out = run_mpi(n, args);
    assert!(
        out.status.success(),
        "mpirun -np {n} vit {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// metrics.jsonl without its timings.
fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let m = v.as_object_mut().unwrap();
            m.remove("seconds");
            m.remove("images_per_second");
            m.remove("sync_share");
            v
        })
        .collect()
}

/// A dataset and a recipe (`extra` recipe lines; `model`, when given, the `[model]` table's
/// lines in place of the tiny ViT's).
fn setup(extra: &str, model: Option<&str>) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    write_idx_dataset(&dir.path().join("data"), 400, 100, true);
    let mut text = tiny_recipe(&dir.path().join("data"), extra);
    if extra.contains("batch_size =") {
        text = text.replacen("batch_size = 16\n", "", 1);
    }
    if let Some(model) = model {
        text = format!(
            "{}[model]\nimage_size = [28, 28]\nin_channels = 1\nnum_classes = 10\n{model}",
            &text[..text.find("[model]").unwrap()]
        );
    }
    let recipe = dir.path().join("recipe.toml");
    std::fs::write(&recipe, text).unwrap();
    (dir, recipe)
}

/// Trains `recipe` alone and as two processes; asserts the same weights bit for bit and
/// the same metrics, and that only rank 0 reported.
fn one_and_two_agree(extra: &str, model: Option<&str>) {
    let (dir, recipe) = setup(extra, model);
    agree(&dir, &recipe, &[], &format!("{extra} {model:?}"));
}

/// [`one_and_two_agree`] for `recipe` trained with the flags `flags` in `dir`.
fn agree(dir: &tempfile::TempDir, recipe: &Path, flags: &[&str], what: &str) {
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let args = |out: &Path| -> Vec<String> {
        let mut a = ["train", "--config", p(recipe), "--out", p(out), "--quiet"].to_vec();
        a.extend(flags);
        a.into_iter().map(String::from).collect()
    };
    let (a1, a2) = (args(&one), args(&two));
    ok(&a1.iter().map(String::as_str).collect::<Vec<_>>());
    let out = ok_mpi(2, &a2.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.matches("test accuracy").count(), 1, "{out}");
    for f in ["checkpoint-last.safetensors", "checkpoint-best.safetensors"] {
        assert!(
            weights(&one.join(f)) == weights(&two.join(f)),
            "{what}: {f} differs between one process and two"
        );
    }
    assert_eq!(metrics(&one), metrics(&two));
    let test = |run: &Path| std::fs::read_to_string(run.join("test.json")).unwrap();
    assert_eq!(test(&one), test(&two));
}

#[test]
fn two_processes_train_the_same_weights_as_one() {
    // A ViT with drop-path (random streams per shard) and dropout.
    one_and_two_agree(
        "epochs = 2\nval_size = 50\ndrop_path = 0.1\nlabel_smoothing = 0.1\n",
        None,
    );
    // Gradient accumulation: each process sums its shard of every micro-batch in a lane.
    one_and_two_agree(
        "epochs = 1\nval_size = 50\nbatch_size = 32\naccum_steps = 2\n",
        None,
    );
}

#[test]
fn two_processes_label_with_the_teacher_and_share_its_cache_as_one() {
    let (dir, recipe) = setup("epochs = 1\nval_size = 50\nmax_steps = 6\n", None);
    let teacher = dir.path().join("teacher");
    ok(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&teacher),
        "--max-steps",
        "3",
        "--quiet",
    ]);
    let ck = teacher.join("checkpoint-last.safetensors");
    // The teacher on each process's shard of every batch, then its logits cached once
    // (each process labels part of the images; the parts are shared).
    for cache in ["false", "true"] {
        let flags = [
            "--teacher",
            p(&ck),
            "--distill",
            "soft",
            "--teacher-cache",
            cache,
        ];
        agree(&dir, &recipe, &flags, &format!("teacher cache {cache}"));
        for run in ["one", "two"] {
            std::fs::remove_dir_all(dir.path().join(run)).unwrap();
        }
    }
}

#[test]
fn two_processes_pool_batch_norm_statistics_as_one() {
    // A ResNet: each shard normalised by its own statistics, the running ones moved by
    // all shards' together, whichever process ran them.
    one_and_two_agree(
        "epochs = 1\nval_size = 50\nmax_steps = 6\n",
        Some(
            "arch = \"resnet\"\nblock = \"basic\"\nlayers = [1, 1]\nchannels = [4, 8]\n\
             stem_width = 4\nstem = \"small\"\n",
        ),
    );
}

#[test]
fn a_two_process_run_resumes_with_two_and_refuses_three() {
    let (dir, recipe) = setup("epochs = 8\nval_size = 50\n", None);
    let (full, part) = (dir.path().join("full"), dir.path().join("part"));
    ok(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&full),
        "--quiet",
    ]);
    // Two processes, stopped after their first checkpoint (mpirun passes SIGTERM on).
    let args = [
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&part),
        "--quiet",
        "--checkpoint-every",
        "1",
    ];
    let mut job = mpirun_job(2, &args, "resume")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&part.join("checkpoint-last.safetensors"));
    Command::new("kill")
        .args(["-TERM", &job.id().to_string()])
        .status()
        .unwrap();
    job.wait().unwrap();
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_vit")).unwrap();
    let start = Instant::now();
    while (rank_pid(&exe, 0, "resume").is_some() || rank_pid(&exe, 1, "resume").is_some())
        && start.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let epochs = |run: &Path| {
        std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |m| m.lines().count())
    };
    assert!(epochs(&part) < 8, "the job finished before it was stopped");
    // Three processes would split a micro-batch otherwise: refused, in one line.
    let out = run_mpi(3, &["train", "--resume", p(&part), "--quiet"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("this run was trained by 2 processes") && err.contains("mpirun -np 2"),
        "{err}"
    );
    // Two finish it as one process alone did.
    ok_mpi(2, &["train", "--resume", p(&part), "--quiet"]);
    assert!(
        weights(&full.join("checkpoint-last.safetensors"))
            == weights(&part.join("checkpoint-last.safetensors"))
    );
    assert_eq!(metrics(&full), metrics(&part));
}

/// Waits (two minutes at most) for `path` to appear.
fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(path.exists(), "no {} after 2 minutes", path.display());
}

/// The pid of rank `rank` of the job `job` ([`mpirun_job`]) among the processes running
/// `exe`, from their environment.
fn rank_pid(exe: &Path, rank: usize, job: &str) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(path) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        if path != exe {
            continue;
        }
        let env = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let (rank, job) = (
            format!("OMPI_COMM_WORLD_RANK={rank}"),
            format!("VIT_TEST_JOB={job}"),
        );
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        if vars.contains(&rank.as_bytes()) && vars.contains(&job.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_dead_rank_ends_the_job_quickly_and_the_last_checkpoint_is_intact() {
    let (dir, recipe) = setup("epochs = 50\nval_size = 50\n", None);
    let run = dir.path().join("run");
    let mut job = mpirun_job(
        2,
        &[
            "train",
            "--config",
            p(&recipe),
            "--out",
            p(&run),
            "--quiet",
            "--checkpoint-every",
            "1",
        ],
        "fault",
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let last = run.join("checkpoint-last.safetensors");
    wait_for(&last);
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_vit")).unwrap();
    let victim = rank_pid(&exe, 1, "fault").expect("rank 1 is running");
    let killed = Instant::now();
    Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .unwrap();
    // The job ends by itself, soon.
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            job.kill().unwrap();
            panic!("the job still runs 30 s after one of its processes died");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let waited = killed.elapsed();
    let mut err = String::new();
    std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(waited < Duration::from_secs(10), "took {waited:?}");
    assert!(
        err.contains("rank 1") && err.contains("signal 9"),
        "mpirun's message: {err}"
    );
    assert!(
        rank_pid(&exe, 0, "fault").is_none(),
        "rank 0 outlived the job"
    );
    // The last checkpoint is whole (written atomically), and a run resumes from it.
    assert!(!weights(&last).is_empty());
    ok(&[
        "eval",
        "--checkpoint",
        p(&last),
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        p(&dir.path().join("data")),
    ]);
}
