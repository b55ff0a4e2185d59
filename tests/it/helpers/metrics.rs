//! Reading `GET /metrics`: one parser of the Prometheus text format for every test.

use std::collections::BTreeMap;

/// One sample of the text format: `name{label="value",…} number`.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One scrape of `/metrics`: the text as served, and its samples.
#[derive(Debug)]
pub struct Metrics {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// `GET {base}/metrics` (no token), parsed.
    pub async fn scrape(base: &str) -> Self {
        let text = super::app::client()
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        Self::parse(text)
    }

    /// Parses the text format (no escaped quotes or commas in our label values).
    pub fn parse(text: String) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, rest.strip_suffix('}')?),
                    None => (series, ""),
                };
                let labels = labels
                    .split(',')
                    .filter(|pair| !pair.is_empty())
                    .filter_map(|pair| {
                        let (k, v) = pair.split_once('=')?;
                        Some((k.to_owned(), v.trim_matches('"').to_owned()))
                    })
                    .collect();
                Some(Sample {
                    name: name.to_owned(),
                    labels,
                    value: value.parse().ok()?,
                })
            })
            .collect();
        Self { text, samples }
    }

    /// The value of the series with exactly these labels, if it exists.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    /// The value of one series written as Prometheus prints it (`name{label="value",…}`,
    /// labels in the exporter's order), as printed.
    pub fn printed(&self, series: &str) -> Option<&str> {
        self.text
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(str::trim)
    }

    /// Like [`Metrics::printed`], as a number; 0 when the series does not exist yet.
    pub fn get(&self, series: &str) -> f64 {
        self.printed(series)
            .map(|value| value.parse().unwrap())
            .unwrap_or(0.0)
    }
}
