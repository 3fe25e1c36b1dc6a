//! Percentiles of latency samples (milliseconds).

/// Sorted samples with nearest-rank percentiles.
#[derive(Debug, Clone, Default)]
pub struct Samples(Vec<f64>);

impl Samples {
    pub fn new(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        Self(v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The `p` quantile (0..=1), or NaN without samples.
    pub fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[i.min(self.0.len() - 1)]
    }

    pub fn p50(&self) -> f64 {
        self.pct(0.50)
    }

    pub fn p99(&self) -> f64 {
        self.pct(0.99)
    }

    pub fn mean(&self) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        self.0.iter().sum::<f64>() / self.0.len() as f64
    }
}
