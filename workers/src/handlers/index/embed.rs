//! Embedding a batch's changed chunks: `embed_batch` inputs per request, source by source
//! after a failed request, so that one bad source fails alone.

use std::collections::BTreeMap;

use llm::LlmError;
use uuid::Uuid;

use super::failure::{Failure, is_permanent, is_unavailable};
use super::{IndexError, Indexer, PassReport, Pending, Plan, chunk};

impl Indexer {
    /// Embed the pending chunks, `embed_batch` inputs per request. A request the embedder
    /// rejects (4xx) is retried source by source; one that fails otherwise while the embedder
    /// works for other requests too. Sources that still fail get their `failure`. Returns the
    /// plans given up on because the embedder is unavailable on the job's last attempt (sorted;
    /// empty otherwise — before the last attempt that is an error).
    ///
    /// A request carries one org's chunks only (`pending` is put in org order first), so its
    /// tokens are that org's: added to `spent`, which the caller records once the batch's
    /// transaction is over.
    pub(super) async fn embed_pending(
        &self,
        pending: &mut [Pending],
        plans: &mut [Plan],
        report: &mut PassReport,
        last_attempt: bool,
        spent: &mut BTreeMap<Uuid, u64>,
    ) -> Result<Vec<usize>, IndexError> {
        // (stable: each source's chunks stay in order)
        pending.sort_by_key(|p| org_of(&plans[p.plan]));
        let mut worked = false;
        let mut failed: Vec<(std::ops::Range<usize>, LlmError)> = Vec::new();
        let mut unavailable: Option<(usize, LlmError)> = None;
        let mut start = 0;
        while start < pending.len() {
            let org = org_of(&plans[pending[start].plan]);
            let end = pending[start..]
                .iter()
                .take(self.embed_batch)
                .take_while(|p| org_of(&plans[p.plan]) == org)
                .count()
                + start;
            let inputs: Vec<String> = pending[start..end]
                .iter()
                .map(|p| chunk::embedding_input(&p.chunk))
                .collect();
            report.embed_requests += 1;
            match self.llm.embed(&self.model, &inputs).await {
                Ok(embedded) => {
                    worked = true;
                    spend(spent, org, embedded.tokens);
                    for (p, v) in pending[start..end].iter_mut().zip(embedded.vectors) {
                        p.vector = Some(v);
                    }
                }
                Err(e) if is_unavailable(&e) => {
                    unavailable = Some((start, e));
                    break;
                }
                Err(e) => failed.push((start..end, e)),
            }
            start = end;
        }
        let mut transient: Vec<(usize, LlmError)> = Vec::new();
        if unavailable.is_none() {
            for (range, e) in failed {
                tracing::warn!(error = %e, "an embedding request failed; retrying source by source");
                match self
                    .embed_one_by_one(&mut pending[range.clone()], plans, report, spent)
                    .await
                {
                    Ok((any, failures)) => {
                        worked |= any;
                        transient.extend(failures);
                    }
                    Err(e) => {
                        unavailable = Some((range.start, e));
                        break;
                    }
                }
            }
        }
        if unavailable.is_none() && !transient.is_empty() {
            if worked {
                // the embedder works: these sources fail on their own
                for (plan, e) in transient {
                    plans[plan].failure = Some(Failure::Transient(format!("embedding: {e}")));
                }
            } else if let Some((_, e)) = transient.into_iter().next() {
                // nothing got through: the embedder, not the inputs
                unavailable = Some((0, e));
            }
        }
        let Some((from, e)) = unavailable else {
            return Ok(Vec::new());
        };
        if !last_attempt {
            return Err(IndexError::Embed(e));
        }
        tracing::warn!(error = %e, "the embedder failed on the last attempt");
        let mut gave_up: Vec<usize> = pending[from..]
            .iter()
            .filter(|p| p.vector.is_none())
            .map(|p| p.plan)
            .collect();
        gave_up.sort_unstable();
        gave_up.dedup();
        Ok(gave_up)
    }

    /// After a failed request: embed its inputs source by source. A source the embedder
    /// rejects (4xx) gets its `failure`; other failures are returned with their plan (the
    /// caller decides whether they are the source's or the embedder's); an unavailable
    /// embedder is an error. Also returns whether any source got through.
    async fn embed_one_by_one(
        &self,
        pending: &mut [Pending],
        plans: &mut [Plan],
        report: &mut PassReport,
        spent: &mut BTreeMap<Uuid, u64>,
    ) -> Result<(bool, Vec<(usize, LlmError)>), LlmError> {
        let mut by_plan: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, p) in pending.iter().enumerate() {
            by_plan.entry(p.plan).or_default().push(i);
        }
        let mut worked = false;
        let mut failures = Vec::new();
        for (plan, idx) in by_plan {
            if plans[plan].failure.is_some() {
                continue;
            }
            let inputs: Vec<String> = idx
                .iter()
                .map(|i| chunk::embedding_input(&pending[*i].chunk))
                .collect();
            report.embed_requests += 1;
            match self.llm.embed(&self.model, &inputs).await {
                Ok(embedded) => {
                    worked = true;
                    spend(spent, org_of(&plans[plan]), embedded.tokens);
                    for (i, v) in idx.iter().zip(embedded.vectors) {
                        pending[*i].vector = Some(v);
                    }
                }
                Err(e) if is_permanent(&e) => plans[plan].failure = Some(Failure::Rejected),
                Err(e) if is_unavailable(&e) => return Err(e),
                Err(e) => failures.push((plan, e)),
            }
        }
        Ok((worked, failures))
    }
}

/// The org of a plan's source (every plan with pending chunks has its content).
fn org_of(plan: &Plan) -> Option<Uuid> {
    plan.content.as_ref().map(|c| c.org_id.into_uuid())
}

/// Add a request's tokens to its org's spend.
fn spend(spent: &mut BTreeMap<Uuid, u64>, org: Option<Uuid>, tokens: u64) {
    if let Some(org) = org {
        let t = spent.entry(org).or_default();
        *t = t.saturating_add(tokens);
    }
}
