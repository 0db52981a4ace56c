//! The results model: per scenario, every run of every contender, median/min/max per figure, ratios
//! measured within each round, and the targets checked against them.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::stats::{Summary, summarize};

/// Figures of one run (name -> value).
pub type Figures = BTreeMap<String, f64>;

/// One run of one contender.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub round: usize,
    pub figures: Figures,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

/// Every run of one contender and the summary of each figure.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ContenderResult {
    pub runs: Vec<Run>,
    pub summary: BTreeMap<String, Summary>,
    /// Runs that failed (the scenario is reported as failed for this contender if all did).
    pub failed_runs: usize,
    pub failed: bool,
}

/// A target from the issue, checked.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub scenario: String,
    pub target: String,
    pub measured: String,
    pub value: Option<f64>,
    /// `None`: could not be evaluated (a contender failed).
    pub met: Option<bool>,
}

/// One scenario's results.
#[derive(Debug, Clone, Serialize)]
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
    pub fn check(
        &mut self,
        target: &str,
        value: Option<f64>,
        measured: String,
        met: impl Fn(f64) -> bool,
    ) {
        self.checks.push(Check {
            scenario: self.id.clone(),
            target: target.into(),
            measured: if value.is_some() {
                measured
            } else {
                "not measured (a contender failed)".into()
            },
            value,
            met: value.map(met),
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
