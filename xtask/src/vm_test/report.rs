//! Results of a vm-test run and the summary table: one row per scenario, one column per
//! kernel, PASS/FAIL and the seconds each took.

use std::{fmt::Write as _, time::Duration};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    Pass,
    Fail,
}

pub struct ScenarioResult {
    pub name: String,
    pub outcome: Outcome,
    /// From its BEGIN line to its RESULT line, as the host saw them; `None` if it never ran.
    pub seconds: Option<f64>,
    pub detail: String,
}

/// One kernel's pair of VMs.
#[derive(Default)]
pub struct KernelRun {
    /// From starting QEMU to the client's init reporting in.
    pub boot: Option<Duration>,
    pub total: Duration,
    pub results: Vec<ScenarioResult>,
    /// Why the run ended early (watchdog, panic, a VM gone), if it did.
    pub failure: Option<String>,
    /// Console tails to show when anything failed.
    pub tails: Vec<String>,
}

impl KernelRun {
    pub fn passed(&self) -> bool {
        self.failure.is_none() && self.results.iter().all(|r| r.outcome == Outcome::Pass)
    }
}

/// A kernel's column: its label (`6.12 (6.12.117+deb12-amd64)`) and its run, or why it could
/// not run at all.
pub struct Column {
    pub series: &'static str,
    pub label: String,
    pub run: Result<KernelRun, String>,
    /// Wall time for the kernel: its download and unpacking (first run only) and the
    /// initramfs included, unlike the table's "total".
    pub wall: Duration,
}

/// For each kernel that failed: why, the failed scenarios, and the console tails.
pub fn print_failures(columns: &[Column]) {
    for column in columns {
        match &column.run {
            Err(why) => println!("\nvm-test: {} did not run: {why}", column.label),
            Ok(run) if !run.passed() => {
                println!("\nvm-test: {} FAILED", column.label);
                if let Some(why) = &run.failure {
                    println!("  {why}");
                }
                for r in run.results.iter().filter(|r| r.outcome == Outcome::Fail) {
                    println!("  {} FAIL: {}", r.name, r.detail);
                }
                for tail in &run.tails {
                    print!("{tail}");
                }
            }
            Ok(_) => {}
        }
    }
}

/// How many scenario runs passed, and what failed as `<series> <scenario>` (or why a kernel
/// failed without a failed scenario).
pub fn tally(columns: &[Column]) -> (usize, Vec<String>) {
    let mut passed = 0;
    let mut failed = Vec::new();
    for column in columns {
        let series = column.series;
        match &column.run {
            Err(_) => failed.push(format!("{series} (did not run)")),
            Ok(run) => {
                for r in &run.results {
                    match r.outcome {
                        Outcome::Pass => passed += 1,
                        Outcome::Fail => failed.push(format!("{series} {}", r.name)),
                    }
                }
                if let Some(why) = &run.failure
                    && run.results.iter().all(|r| r.outcome == Outcome::Pass)
                {
                    failed.push(format!("{series} ({why})"));
                }
            }
        }
    }
    (passed, failed)
}

/// The summary table, scenarios in `order`.
pub fn table(order: &[String], columns: &[Column]) -> String {
    const NAME: usize = 12;
    let width = columns
        .iter()
        .map(|c| c.label.len())
        .max()
        .unwrap_or(0)
        .max(16);
    let mut out = String::new();
    let _ = write!(out, "{:<NAME$}", "scenario");
    for c in columns {
        let _ = write!(out, "  {:<width$}", c.label);
    }
    out.push('\n');
    let cell = |text: String| format!("  {text:<width$}");
    for name in order {
        let _ = write!(out, "{name:<NAME$}");
        for c in columns {
            let text = match &c.run {
                Err(_) => "-".to_owned(),
                Ok(run) => match run.results.iter().find(|r| &r.name == name) {
                    None => "-".to_owned(),
                    Some(r) => {
                        let verdict = if r.outcome == Outcome::Pass {
                            "PASS"
                        } else {
                            "FAIL"
                        };
                        match r.seconds {
                            Some(s) => format!("{verdict} {s:>6.1} s"),
                            None => format!("{verdict}      - "),
                        }
                    }
                },
            };
            out.push_str(&cell(text));
        }
        out.push('\n');
    }
    for (what, pick) in [
        (
            "boot",
            (|run: &KernelRun| run.boot) as fn(&KernelRun) -> Option<Duration>,
        ),
        ("total", |run: &KernelRun| Some(run.total)),
    ] {
        let _ = write!(out, "{what:<NAME$}");
        for c in columns {
            let text = match c.run.as_ref().ok().and_then(pick) {
                Some(d) => format!("     {:>6.1} s", d.as_secs_f64()),
                None => "-".to_owned(),
            };
            out.push_str(&cell(text));
        }
        out.push('\n');
    }
    out
}

/// `3m05s`.
pub fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_row_per_scenario_and_a_column_per_kernel() {
        let run = KernelRun {
            boot: Some(Duration::from_millis(9_500)),
            total: Duration::from_secs(200),
            results: vec![
                ScenarioResult {
                    name: "attach".into(),
                    outcome: Outcome::Pass,
                    seconds: Some(7.3),
                    detail: String::new(),
                },
                ScenarioResult {
                    name: "data".into(),
                    outcome: Outcome::Fail,
                    seconds: None,
                    detail: String::new(),
                },
            ],
            failure: None,
            tails: Vec::new(),
        };
        let columns = [
            Column {
                series: "6.1",
                label: "6.1 (6.1.0-56-amd64)".into(),
                run: Ok(run),
                wall: Duration::from_secs(210),
            },
            Column {
                series: "6.12",
                label: "6.12".into(),
                run: Err("no kernel".into()),
                wall: Duration::ZERO,
            },
        ];
        let text = table(&["attach".into(), "data".into()], &columns);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].starts_with("scenario") && lines[0].contains("6.1 (6.1.0-56-amd64)"));
        assert!(
            lines[1].starts_with("attach") && lines[1].contains("PASS    7.3 s"),
            "{text}"
        );
        assert!(lines[2].contains("FAIL"), "{text}");
        assert!(
            lines[3].starts_with("boot") && lines[3].contains("9.5 s"),
            "{text}"
        );
        assert!(
            lines[4].starts_with("total") && lines[4].contains("200.0 s"),
            "{text}"
        );
        let (passed, failed) = tally(&columns);
        assert_eq!(passed, 1);
        assert_eq!(failed, ["6.1 data", "6.12 (did not run)"]);
    }
}
