//! `pgentra check`: diagnose a connection step by step.
//!
//! Each step prints `✓` or `✗` as soon as it is done; the first failure comes with a hint and
//! the remaining steps are skipped. The token itself never appears: only its credential,
//! tenant and expiry. This file runs the steps and reports them; [`steps`] holds what each
//! step does, [`hints`] what to do when one fails.

mod hints;
mod steps;

use crate::Context;
use crate::error::CliError;
use crate::output::outln;
use crate::output::print_json;
use crate::target::Target;
use std::process::ExitCode;

/// Checks DNS, TCP, TLS and the certificate, token acquisition, role derivation, login and a
/// query, each with a hint when it fails.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: Target,
}

/// The steps, in the order they run.
const STEPS: [&str; 8] = [
    "settings", "dns", "tcp", "tls", "token", "role", "login", "query",
];

pub(crate) fn run(args: &Args, context: Context) -> Result<ExitCode, CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::io("starting the async runtime"))?;
    let mut report = Report {
        context,
        steps: Vec::new(),
    };
    runtime.block_on(diagnose(args, &mut report));
    report.finish()
}

/// Runs the steps in [`STEPS`] order until one fails.
async fn diagnose(args: &Args, report: &mut Report) -> Option<()> {
    let target = &args.target;
    let settings = report.record("settings", steps::settings(target))?;
    let addrs = report.record("dns", steps::resolve(&settings).await)?;
    let stream = report.record("tcp", steps::connect(&settings, &addrs).await)?;
    report.record("tls", steps::tls(&settings, stream).await)?;
    let (auth, identity) = report.record("token", steps::token(&target.auth, &settings).await)?;
    let identity = report.record("role", steps::role(identity))?;
    let client = report.record("login", steps::login(&auth, &settings, &identity).await)?;
    report.record("query", steps::query(&client).await)
}

/// Why a step failed, and what to do about it.
struct Failure {
    detail: String,
    hint: String,
}

fn failure(detail: impl Into<String>, hint: impl Into<String>) -> Failure {
    Failure {
        detail: detail.into(),
        hint: hint.into(),
    }
}

/// A step's result: a value for the next steps and a one-line detail.
type StepResult<T> = Result<(T, String), Failure>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Failed,
    Skipped,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

struct Step {
    name: &'static str,
    status: Status,
    detail: String,
    hint: Option<String>,
}

struct Report {
    context: Context,
    steps: Vec<Step>,
}

impl Report {
    /// Records (and, without `--json`, prints) a step; the value if it passed.
    fn record<T>(&mut self, name: &'static str, result: StepResult<T>) -> Option<T> {
        let (value, status, detail, hint) = match result {
            Ok((value, detail)) => (Some(value), Status::Ok, detail, None),
            Err(Failure { detail, hint }) => (None, Status::Failed, detail, Some(hint)),
        };
        self.push(Step {
            name,
            status,
            detail,
            hint,
        });
        value
    }

    fn push(&mut self, step: Step) {
        if !self.context.json {
            print_step(&step, self.context);
        }
        self.steps.push(step);
    }

    /// Marks the steps that did not run as skipped, prints the JSON, and fails if a step did.
    fn finish(mut self) -> Result<ExitCode, CliError> {
        let failed = self
            .steps
            .iter()
            .position(|step| step.status == Status::Failed);
        for name in STEPS.iter().skip(self.steps.len()) {
            let after = failed.map_or("", |index| STEPS[index]);
            self.push(Step {
                name,
                status: Status::Skipped,
                detail: format!("not run: the {after} step failed"),
                hint: None,
            });
        }
        if self.context.json {
            let steps: Vec<_> = self
                .steps
                .iter()
                .map(|step| {
                    serde_json::json!({
                        "step": step.name,
                        "status": step.status.as_str(),
                        "detail": step.detail,
                        "hint": step.hint,
                    })
                })
                .collect();
            print_json(&serde_json::json!({ "ok": failed.is_none(), "steps": steps }));
        }
        match failed.map(|index| &self.steps[index]) {
            None => Ok(ExitCode::SUCCESS),
            Some(step) => Err(CliError::Failed(format!(
                "check failed at the {} step: {}",
                step.name, step.detail
            ))),
        }
    }
}

fn print_step(step: &Step, context: Context) {
    let style = context.style;
    let name = format!("{:<8}", step.name);
    match step.status {
        Status::Ok => outln!("{} {}  {}", style.good("✓"), style.bold(&name), step.detail),
        Status::Failed => {
            outln!(
                "{} {}  {}",
                style.bad("✗"),
                style.bold(&name),
                style.bad(&step.detail)
            );
            if let Some(hint) = &step.hint {
                // Under the detail: the mark, a space, the name and two spaces.
                outln!("{:12}{} {hint}", "", style.dim("hint:"));
            }
        }
        Status::Skipped => outln!("{}", style.dim(&format!("- {name}  skipped"))),
    }
}
