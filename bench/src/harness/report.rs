//! The results model: per scenario, every run of every contender, median/min/max per figure, ratios
//! measured within each round, and the targets checked against them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::stats::{Summary, summarize};

/// Figures of one run (name -> value).
pub type Figures = BTreeMap<String, f64>;

/// One run of one contender.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub round: usize,
    pub figures: Figures,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

/// Every run of one contender and the summary of each figure.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContenderResult {
    pub runs: Vec<Run>,
    pub summary: BTreeMap<String, Summary>,
    /// Runs that failed (the scenario is reported as failed for this contender if all did).
    pub failed_runs: usize,
    pub failed: bool,
}

/// A target from the issue, checked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub scenario: String,
    pub target: String,
    pub measured: String,
    pub value: Option<f64>,
    /// `None`: could not be evaluated (a contender failed).
    pub met: Option<bool>,
}

/// One scenario's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub id: String,
    pub title: String,
    pub setup: String,
    pub contenders: BTreeMap<String, ContenderResult>,
    /// Ratios computed within each round, summarised across rounds.
    pub ratios: BTreeMap<String, Summary>,
    pub ratio_runs: BTreeMap<String, Vec<f64>>,
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
}

impl ScenarioResult {
    /// Builds the result from per-round runs (`rounds[round][contender]`).
    pub fn new(id: &str, title: &str, setup: String, runs: &[BTreeMap<String, Run>]) -> Self {
        let mut contenders: BTreeMap<String, ContenderResult> = BTreeMap::new();
        for round in runs {
            for (name, run) in round {
                let c = contenders.entry(name.clone()).or_default();
                if run.error.is_some() {
                    c.failed_runs += 1;
                }
                c.runs.push(run.clone());
            }
        }
        for c in contenders.values_mut() {
            let mut keys: Vec<&String> = c.runs.iter().flat_map(|r| r.figures.keys()).collect();
            keys.sort();
            keys.dedup();
            let mut summary = BTreeMap::new();
            for k in keys {
                let vals: Vec<f64> = c
                    .runs
                    .iter()
                    .filter(|r| r.error.is_none())
                    .filter_map(|r| r.figures.get(k).copied())
                    .collect();
                if let Some(s) = summarize(&vals) {
                    summary.insert(k.clone(), s);
                }
            }
            c.summary = summary;
            c.failed = c.failed_runs == c.runs.len();
        }
        Self {
            id: id.into(),
            title: title.into(),
            setup,
            contenders,
            ratios: BTreeMap::new(),
            ratio_runs: BTreeMap::new(),
            checks: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// The runs regrouped by round (`rounds[round][contender]`).
    pub fn rounds(&self) -> Vec<BTreeMap<String, Run>> {
        let mut out: Vec<BTreeMap<String, Run>> = Vec::new();
        for (name, c) in &self.contenders {
            for r in &c.runs {
                if out.len() <= r.round {
                    out.resize_with(r.round + 1, BTreeMap::new);
                }
                out[r.round].insert(name.clone(), r.clone());
            }
        }
        out
    }

    /// Adds `meshid/<other> <figure>` for nginx and haproxy, per round, unless already there.
    pub fn add_meshid_ratios(&mut self, figures: &[&str]) {
        let rounds = self.rounds();
        for other in ["nginx", "haproxy"] {
            for f in figures {
                let name = format!("meshid/{other} {f}");
                if !self.ratio_runs.contains_key(&name) {
                    self.add_ratio(&name, &rounds, |r| ratio_of(r, "meshid", other, f));
                }
            }
        }
    }

    /// Median of `figure` for `contender`.
    pub fn median(&self, contender: &str, figure: &str) -> Option<f64> {
        self.contenders
            .get(contender)
            .filter(|c| !c.failed)
            .and_then(|c| c.summary.get(figure))
            .map(|s| s.median)
    }

    /// Adds a ratio computed in each round from that round's runs.
    pub fn add_ratio(
        &mut self,
        name: &str,
        runs: &[BTreeMap<String, Run>],
        f: impl Fn(&BTreeMap<String, Run>) -> Option<f64>,
    ) -> Option<Summary> {
        let vals: Vec<f64> = runs
            .iter()
            .filter_map(&f)
            .filter(|v| v.is_finite())
            .collect();
        let s = summarize(&vals);
        self.ratio_runs.insert(name.into(), vals);
        if let Some(s) = s {
            self.ratios.insert(name.into(), s);
        }
        s
    }

    /// Records a target check: `met(value)` decides it; no value means it could not be evaluated.
    /// Nor can it when a contender of the scenario failed some of its runs but not all: a median
    /// of the rounds left is not the figure the target names (it would read "met" on one round of
    /// three). A contender that failed every run gives no value to a check that needs it.
    pub fn check(
        &mut self,
        target: &str,
        value: Option<f64>,
        measured: String,
        met: impl Fn(f64) -> bool,
    ) {
        let partly = self.contenders.values().filter(|c| !c.failed);
        let runs: usize = partly.clone().map(|c| c.runs.len()).sum();
        let failed: usize = partly.map(|c| c.failed_runs).sum();
        let (measured, met) = match value {
            None => ("not measured (a contender failed)".to_owned(), None),
            Some(_) if failed > 0 => (
                format!("{measured}; not evaluated: {failed} of {runs} runs failed"),
                None,
            ),
            Some(v) => (measured, Some(met(v))),
        };
        self.checks.push(Check {
            scenario: self.id.clone(),
            target: target.into(),
            measured,
            value,
            met,
        });
    }
}

/// The figure `fig` of `contender` in one round, if that run succeeded.
pub fn fig(round: &BTreeMap<String, Run>, contender: &str, fig: &str) -> Option<f64> {
    round
        .get(contender)
        .filter(|r| r.error.is_none())
        .and_then(|r| r.figures.get(fig).copied())
}

/// `a / b` of one figure between two contenders in one round.
pub fn ratio_of(round: &BTreeMap<String, Run>, a: &str, b: &str, f: &str) -> Option<f64> {
    let (x, y) = (fig(round, a, f)?, fig(round, b, f)?);
    (y != 0.0).then(|| x / y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(round: usize, figs: &[(&str, f64)], error: Option<&str>) -> Run {
        Run {
            round,
            figures: figs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            error: error.map(str::to_owned),
            detail: serde_json::Value::Null,
        }
    }

    fn rounds() -> Vec<BTreeMap<String, Run>> {
        (0..3)
            .map(|i| {
                let mut r = BTreeMap::new();
                r.insert("meshid".into(), run(i, &[("rps", 30.0 + i as f64)], None));
                r.insert("nginx".into(), run(i, &[("rps", 20.0)], None));
                r.insert("haproxy".into(), run(i, &[], Some("did not listen")));
                r
            })
            .collect()
    }

    #[test]
    fn summaries_ratios_and_failures() {
        let runs = rounds();
        let mut s = ScenarioResult::new("t", "T", "setup".into(), &runs);
        assert_eq!(s.median("meshid", "rps"), Some(31.0));
        assert!(s.contenders["haproxy"].failed);
        assert_eq!(s.contenders["haproxy"].failed_runs, 3);
        assert_eq!(s.median("haproxy", "rps"), None);

        let r = s.add_ratio("meshid/nginx rps", &runs, |r| {
            ratio_of(r, "meshid", "nginx", "rps")
        });
        assert_eq!(r.map(|r| (r.min, r.median, r.max)), Some((1.5, 1.55, 1.6)));
        let none = s.add_ratio("meshid/haproxy rps", &runs, |r| {
            ratio_of(r, "meshid", "haproxy", "rps")
        });
        assert!(none.is_none(), "a failed contender gives no ratio");

        s.check("x >= 1.3", r.map(|r| r.median), "1.55x".into(), |x| {
            x >= 1.3
        });
        s.check("y", none.map(|r| r.median), String::new(), |x| x >= 1.0);
        assert_eq!(s.checks[0].met, Some(true));
        assert_eq!(s.checks[1].met, None, "reported as failed, not dropped");
        // One round of three failed for a contender: its medians are two rounds', not evaluated.
        let mut partly = rounds();
        partly[1].get_mut("nginx").unwrap().error = Some("boom".into());
        let mut p = ScenarioResult::new("t", "T", "setup".into(), &partly);
        p.check("x >= 1.3", Some(1.55), "1.55x".into(), |x| x >= 1.3);
        assert_eq!(p.checks[0].met, None);
        assert!(
            p.checks[0].measured.contains("1 of 6 runs failed"),
            "{}",
            p.checks[0].measured
        );
    }
}
