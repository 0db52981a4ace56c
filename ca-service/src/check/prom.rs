//! A reader of the Prometheus text format, enough for `meshid-ca check` to read our own
//! components' `/metrics`: samples with their labels. Lines it cannot read are skipped and counted;
//! nothing a server sends makes it panic.

/// One sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of a scrape, and how many lines could not be read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    pub unreadable: usize,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match sample(line) {
                Some(s) => out.samples.push(s),
                None => out.unreadable += 1,
            }
        }
        out
    }

    /// Samples named `name` whose labels include every pair of `with`.
    pub fn find<'a>(
        &'a self,
        name: &'a str,
        with: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name == name && with.iter().all(|(k, v)| s.label(k) == Some(*v)))
    }

    /// The one value of an unlabelled metric.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.find(name, &[]).next().map(|s| s.value)
    }

    /// The sum over matching samples (0 when none).
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.find(name, with).map(|s| s.value).sum()
    }
}

fn sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let (parsed, after) = label_set(body)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `k="v",k2="v2"}` and what follows the closing brace.
fn label_set(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        let mut chars = s[eq + 1..].char_indices();
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        let mut end = None;
        let mut escaped = false;
        for (i, c) in chars {
            match (escaped, c) {
                (true, 'n') => value.push('\n'),
                (true, c) => value.push(c),
                (false, '\\') => {
                    escaped = true;
                    continue;
                }
                (false, '"') => {
                    end = Some(eq + 1 + i + 1);
                    break;
                }
                (false, c) => value.push(c),
            }
            escaped = false;
        }
        labels.push((key, value));
        s = &s[end?..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ours_and_survives_garbage() {
        let text = "# HELP x\nmeshid_ca_bundle_version 3\n\
            meshid_ca_sidecars{acked_version=\"2\"} 5\n\
            meshid_ca_issue_requests_total{method=\"renewal\",result=\"issued\"} 7 1700000000\n\
            weird{a=\"q\\\"uote\"} 1\n\
            {oops} 1\nbroken{a=\"x} 2\nnovalue\n\u{0}\u{ffff}{{{\n";
        let s = Scrape::parse(text);
        assert_eq!(s.value("meshid_ca_bundle_version"), Some(3.0));
        assert_eq!(s.sum("meshid_ca_sidecars", &[("acked_version", "2")]), 5.0);
        assert_eq!(
            s.sum("meshid_ca_issue_requests_total", &[("method", "renewal")]),
            7.0
        );
        assert_eq!(s.find("weird", &[("a", "q\"uote")]).count(), 1);
        assert_eq!(s.unreadable, 4);
    }
}
