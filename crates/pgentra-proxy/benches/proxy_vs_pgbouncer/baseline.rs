//! The previous build (`PGENTRA_BENCH_BASELINE=<git rev>`): that revision's copy of this bench,
//! built in a git worktree of its own, runs as a second proxy helper ("previous") with the same
//! `--serve-proxy` arguments as this build's, in the same rounds; and the tables that compare
//! the two, row by row.

use crate::{Result, Sample};
use serde_json::Value;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long building the previous revision may take (its first build compiles everything).
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// A progress line this often while it builds.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// The target, in every row: this build's TPS at least 97 % of the previous build's, and its
/// CPU time per transaction at most 103 %.
const TPS_TARGET: f64 = 0.97;
const CPU_TARGET: f64 = 1.03;
/// The bench target to build, as in this package's `[[bench]]`.
const BENCH: &str = "proxy_vs_pgbouncer";

/// The previous revision's bench binary.
pub(crate) struct Baseline {
    /// The revision as given and its commit's short hash.
    pub(crate) described: String,
    pub(crate) exe: PathBuf,
}

impl Baseline {
    /// Builds `rev`'s bench in a temporary worktree of this repository (removed when done, also
    /// on error), into a target directory of its own inside this build's (`baseline-build`),
    /// which later runs reuse.
    pub(crate) fn build(rev: &str) -> Result<Self> {
        let started = Instant::now();
        let package_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = PathBuf::from(git(package_dir, &["rev-parse", "--show-toplevel"])?);
        let commit = git(
            &root,
            &["rev-parse", "--verify", &format!("{rev}^{{commit}}")],
        )
        .map_err(|e| format!("PGENTRA_BENCH_BASELINE={rev:?} names no commit: {e}"))?;
        let described = format!(
            "{rev} = {}",
            git(&root, &["rev-parse", "--short", &commit])?
        );
        let subject = git(&root, &["show", "-s", "--format=%s", &commit])?;
        let target_dir = target_dir(package_dir)?.join("baseline-build");
        let worktree = Worktree::add(&root, &commit)?;
        println!("previous build: {described} ({subject})");
        println!(
            "previous build: building in {} (target directory {}, at most {} min)",
            worktree.dir.display(),
            target_dir.display(),
            BUILD_TIMEOUT.as_secs() / 60,
        );
        // The same package directory in the previous revision's tree.
        let relative = package_dir.strip_prefix(&root)?;
        let package = worktree.dir.join(relative);
        if !package.is_dir() {
            return Err(format!("{described} has no {}", relative.display()).into());
        }
        let exe = cargo_bench_no_run(&package, &target_dir)?;
        drop(worktree);
        println!(
            "previous build: built in {:.0} s: {}",
            started.elapsed().as_secs_f64(),
            exe.display()
        );
        Ok(Self { described, exe })
    }
}

/// A detached git worktree in a temporary directory, removed when dropped.
struct Worktree {
    repo: PathBuf,
    dir: PathBuf,
}

impl Worktree {
    fn add(repo: &Path, commit: &str) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("pgentra-bench-baseline-{}", std::process::id()));
        let worktree = Self {
            repo: repo.to_owned(),
            dir,
        };
        // Forget worktrees whose directories are gone (left by a killed run, then cleaned up).
        git(repo, &["worktree", "prune"])?;
        let dir = worktree
            .dir
            .to_str()
            .ok_or("temporary directory not UTF-8")?;
        git(repo, &["worktree", "add", "--detach", dir, commit])?;
        Ok(worktree)
    }
}

impl Drop for Worktree {
    fn drop(&mut self) {
        let Some(dir) = self.dir.to_str() else { return };
        if let Err(error) = git(&self.repo, &["worktree", "remove", "--force", dir]) {
            // Not added, or half: what is left of it goes.
            if self.dir.exists() {
                eprintln!("previous build: {error}");
                let _ = std::fs::remove_dir_all(&self.dir);
                let _ = git(&self.repo, &["worktree", "prune"]);
            }
        }
    }
}

/// `program` under `timeout`, which stops it and its children after `limit`.
fn bounded(limit: Duration, program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new("timeout");
    command
        .args(["-k", "10", &limit.as_secs().to_string()])
        .arg(program);
    command
}

/// `git -C dir args`, bounded in time; its output trimmed.
fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let output = bounded(Duration::from_secs(120), "git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !output.status.success() {
        return Err(format!(
            "git {} ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// The cargo that runs this bench (or the one on `PATH`).
fn cargo() -> Command {
    bounded(
        BUILD_TIMEOUT,
        std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
    )
}

/// This workspace's target directory (wherever configuration puts it).
fn target_dir(package_dir: &Path) -> Result<PathBuf> {
    let output = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(package_dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()?;
    if !output.status.success() {
        return Err(format!("cargo metadata: {}", output.status).into());
    }
    let metadata: Value = serde_json::from_slice(&output.stdout)?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| "cargo metadata: no target_directory".into())
}

/// Builds the bench in `package` (its package directory) as CI builds it (pgentra selected
/// too, all features), into `target_dir`, printing progress; returns its executable.
fn cargo_bench_no_run(package: &Path, target_dir: &Path) -> Result<PathBuf> {
    let mut child = cargo()
        .args([
            "bench",
            "--no-run",
            "--quiet",
            "--message-format=json-render-diagnostics",
        ])
        .args([
            "-p",
            "pgentra",
            "-p",
            "pgentra-proxy",
            "--all-features",
            "--bench",
            BENCH,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(package)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("running cargo: {e}"))?;
    let artifacts = artifacts(child.stdout.take().ok_or("no pipe from cargo")?);
    let started = Instant::now();
    let (mut built, mut exe, mut progress) = (0usize, None, started + PROGRESS_EVERY);
    loop {
        match artifacts.recv_timeout(progress.saturating_duration_since(Instant::now())) {
            Ok(executable) => {
                built += 1;
                exe = executable.or(exe);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= progress {
            let seconds = started.elapsed().as_secs_f64();
            println!("previous build: {built} crates built in {seconds:.0} s");
            progress += PROGRESS_EVERY;
        }
    }
    let status = child.wait()?;
    match status.code() {
        Some(0) => exe.ok_or_else(|| format!("cargo built no {BENCH} executable").into()),
        Some(124 | 137) => Err(format!("previous build: not done within {BUILD_TIMEOUT:?}").into()),
        _ => Err(format!("previous build failed ({status}); cargo's messages above").into()),
    }
}

/// A thread reading cargo's JSON messages: for each artifact built, the bench's executable if
/// it is that.
fn artifacts(stdout: std::process::ChildStdout) -> mpsc::Receiver<Option<PathBuf>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let Ok(message) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if message["reason"] != "compiler-artifact" {
                continue;
            }
            let target = &message["target"];
            let is_bench = target["name"] == BENCH
                && target["kind"]
                    .as_array()
                    .is_some_and(|kinds| kinds.iter().any(|kind| kind == "bench"));
            let exe = message["executable"].as_str().filter(|_| is_bench);
            let _ = tx.send(exe.map(PathBuf::from));
        }
    });
    rx
}

/// One row of the comparison: each round's (this build, previous build) samples.
pub(crate) struct Paired {
    label: String,
    rounds: Vec<(Sample, Sample)>,
}

impl Paired {
    /// The samples of targets `this` and `previous` from each round.
    pub(crate) fn new(label: String, rounds: &[Vec<Sample>], this: usize, previous: usize) -> Self {
        Self {
            label,
            rounds: rounds.iter().map(|r| (r[this], r[previous])).collect(),
        }
    }
}

/// This build against the previous one: a table per section, and whether every row was
/// within the target.
pub(crate) struct Versus {
    described: String,
    rows: usize,
    missed: Vec<String>,
}

impl Versus {
    pub(crate) fn new(baseline: &Baseline) -> Self {
        Self {
            described: baseline.described.clone(),
            rows: 0,
            missed: Vec::new(),
        }
    }

    /// A section's table: medians of each build's TPS and CPU per transaction, the median of
    /// each round's this/previous ratio, and every round's ratios.
    pub(crate) fn section(&mut self, title: &str, rows: &[Paired]) {
        if rows.is_empty() {
            return;
        }
        println!(
            "this build vs previous ({}), {title}: medians over the rounds; ratio: the median of each round's this/previous; then each round's ratio",
            self.described
        );
        println!(
            "{:<26} {:>8} {:>8} {:>6} {:>8} {:>8} {:>6}  per round: tps ratios | cpu ratios",
            "", "tps", "previous", "ratio", "cpu µs", "previous", "ratio"
        );
        for row in rows {
            let m = |measure: &dyn Fn(&(Sample, Sample)) -> f64| {
                crate::median(row.rounds.iter().map(measure))
            };
            let (tps_ratio, cpu_ratio) =
                (m(&|(t, p)| t.tps / p.tps), m(&|(t, p)| t.cpu_us / p.cpu_us));
            let each = |ratio: fn(&(Sample, Sample)) -> f64| {
                let ratios: Vec<String> = row
                    .rounds
                    .iter()
                    .map(|r| format!("{:.3}", ratio(r)))
                    .collect();
                ratios.join(" ")
            };
            println!(
                "{:<26} {:>8.0} {:>8.0} {:>6.3} {:>8.1} {:>8.1} {:>6.3}  {} | {}",
                row.label,
                m(&|(t, _)| t.tps),
                m(&|(_, p)| p.tps),
                tps_ratio,
                m(&|(t, _)| t.cpu_us),
                m(&|(_, p)| p.cpu_us),
                cpu_ratio,
                each(|(t, p)| t.tps / p.tps),
                each(|(t, p)| t.cpu_us / p.cpu_us),
            );
            self.rows += 1;
            // NaN (no transactions) misses too.
            if !(tps_ratio >= TPS_TARGET && cpu_ratio <= CPU_TARGET) {
                self.missed.push(format!("{title}: {}", row.label));
            }
        }
    }

    pub(crate) fn verdict(&self) {
        let outcome = match (self.rows, self.missed.is_empty()) {
            (0, _) => "no rows compared".to_owned(),
            (_, true) => format!("met ({} rows)", self.rows),
            (_, false) => format!("MISSED in {}", self.missed.join("; ")),
        };
        println!(
            "verdict: this build vs previous: TPS ratio >= {TPS_TARGET} and CPU ratio <= {CPU_TARGET} in every row (target): {outcome}"
        );
    }
}
