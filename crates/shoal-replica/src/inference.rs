//! An inference request's path through a replica, whatever protocol it
//! came by (REST in [`crate::http`], gRPC in [`crate::grpc`]): the version
//! looked up, a place admitted in its queue *before* the request is read
//! and decoded (an overload is shed before it is paid for), injected
//! faults, a stateful model's sequence step, the run on the inference pool
//! or the version's batcher, the outputs asked for, and the
//! `model_predictions` metrics. The protocols only read requests and write
//! answers.

use std::sync::Arc;

use axum::http::StatusCode;
use shoal_core::Tensor;
use shoal_http::ApiError;
use shoal_oip::DecodedRequest;
use shoal_runtime::RunError;
use tokio::time::Instant;

use crate::Replica;
use crate::metrics::{Outcome, PredictionServed};
use crate::store::ServingVersion;

/// Which model an inference is for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call<'a> {
    /// The model.
    pub(crate) model: &'a str,
    /// The version asked for (`None`: the model's default).
    pub(crate) version: Option<&'a str>,
    /// The replica that answered the sequence's last step, when the
    /// gateway says it was another one (`x-shoal-sequence-from`).
    pub(crate) moved_from: Option<&'a str>,
}

/// What an inference came to.
pub(crate) struct Served {
    /// The version that served it.
    pub(crate) serving: Arc<ServingVersion>,
    /// The request (its inputs taken) and the outputs asked for, or why
    /// not.
    pub(crate) answer: Result<(DecodedRequest, Vec<Tensor>), ApiError>,
}

/// Serves one inference: `read` reads and decodes the request once it is
/// admitted (`Err`: the transport failed, answered as is, unmetered;
/// `Ok(Err)`: the request is invalid, a metered 400). `Err` when no
/// version answers to `call`.
pub(crate) async fn infer<F, Fut>(
    replica: &Replica,
    call: Call<'_>,
    read: F,
) -> Result<Served, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Result<DecodedRequest, String>, ApiError>>,
{
    let mut serving = replica
        .store()
        .lookup(call.model, call.version)
        .map_err(|e| ApiError::not_found(e.to_string()))?;
    // Admitted before the body is read: an overload is shed before it is
    // paid for in reading and parsing. A batched version's batches also
    // wait for requests admitted and not yet decoded (a lone caller never
    // waits).
    let admitted = match &serving.batcher {
        Some(batcher) => batcher.admit().map(Admitted::Batch),
        None => replica.pool().admit().map(Admitted::Pool),
    };
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(e) => {
            PredictionServed {
                model: &serving.model,
                version: &serving.version,
                outcome: Outcome::Overloaded,
                elapsed: std::time::Duration::ZERO,
                error: Some("refused before decoding: overloaded"),
            }
            .emit(&serving.metrics);
            return Err(ApiError::unavailable(e.to_string(), 1));
        }
    };
    let request = read().await?;
    let started = Instant::now();
    if let Some(fault) = replica.fault_for(serving.model.as_str(), serving.version.as_str()) {
        if fault.hang {
            std::future::pending::<()>().await;
        }
        if fault.latency_ms > 0 && rand::random::<f64>() < fault.latency_rate {
            tokio::time::sleep(std::time::Duration::from_millis(fault.latency_ms)).await;
        }
        if fault.error_rate > 0.0 && rand::random::<f64>() < fault.error_rate {
            PredictionServed {
                model: &serving.model,
                version: &serving.version,
                outcome: Outcome::Error,
                elapsed: started.elapsed(),
                error: Some("injected fault"),
            }
            .emit(&serving.metrics);
            return Ok(Served {
                serving,
                answer: Err(ApiError::internal(
                    "injected fault: this replica is configured to fail this share of requests",
                )),
            });
        }
    }
    let result = match request {
        Err(e) => Err((Outcome::InvalidInput, ApiError::bad_request(e))),
        Ok(request) if serving.loaded.state().is_empty() => {
            run_inference(replica, &serving, request, None, admitted).await
        }
        Ok(request) => {
            match begin_step(
                replica,
                &mut serving,
                call.version,
                call.moved_from,
                &request,
            )
            .await
            {
                Ok(step) => run_inference(replica, &serving, request, Some(step), admitted).await,
                Err(e) => Err(e),
            }
        }
    };
    let (outcome, error) = match &result {
        Ok(_) => (Outcome::Success, None),
        Err((outcome, e)) => (*outcome, Some(e.message.as_str())),
    };
    PredictionServed {
        model: &serving.model,
        version: &serving.version,
        outcome,
        elapsed: started.elapsed(),
        error,
    }
    .emit(&serving.metrics);
    Ok(Served {
        serving,
        answer: result.map_err(|(_, e)| e),
    })
}

/// A request's place, taken before its body was read: in the pool's
/// queue, or on its way to its version's batcher.
enum Admitted {
    Pool(
        #[expect(dead_code, reason = "held for its Drop: the admission ends with it")]
        shoal_runtime::Admission,
    ),
    Batch(shoal_runtime::batcher::Arrival),
}

/// A step of a stateful model's sequence, begun: the sequence held (later
/// steps wait), and whether it ends with this step.
struct SequenceStep<'a> {
    guard: crate::sequences::StepGuard<'a>,
    id: shoal_oip::sequence::SequenceId,
    end: bool,
}

fn sequence_error(e: crate::sequences::SequenceError) -> (Outcome, ApiError) {
    match e {
        crate::sequences::SequenceError::Unknown { .. } => {
            (Outcome::InvalidInput, ApiError::bad_request(e.to_string()))
        }
        crate::sequences::SequenceError::TooMany { .. } => (
            Outcome::Overloaded,
            ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
            },
        ),
    }
}

/// Begins the sequence step `request` names, on the version the sequence
/// started on (`serving` becomes that version: state is never fed to
/// another one).
async fn begin_step<'a>(
    replica: &'a Replica,
    serving: &mut Arc<ServingVersion>,
    asked: Option<&str>,
    moved_from: Option<&str>,
    request: &shoal_oip::DecodedRequest,
) -> Result<SequenceStep<'a>, (Outcome, ApiError)> {
    let invalid = |e: String| (Outcome::InvalidInput, ApiError::bad_request(e));
    let model = serving.model.to_string();
    let step = shoal_oip::sequence::Step::from_parameters(request.parameters.as_ref())
        .map_err(invalid)?
        .ok_or_else(|| {
            invalid(format!(
                "{model} is a stateful model (state {}): name the sequence with parameters sequence_id, and sequence_start=true on its first step",
                serving.loaded.state()
            ))
        })?;
    // State inputs may come with a start (the sequence's initial state,
    // zeros otherwise), never with a later step.
    if let Some(input) = request
        .inputs
        .iter()
        .find(|t| !step.start && serving.loaded.state().is_state_input(&t.name))
    {
        return Err(invalid(format!(
            "input {:?} is state this replica keeps between steps (state {}); send only the other inputs (state inputs may come with sequence_start=true, as the initial state)",
            input.name,
            serving.loaded.state()
        )));
    }
    let initial = || {
        serving
            .loaded
            .state()
            .initial(serving.loaded.signature())
            .unwrap_or_default()
    };
    // The gateway says when the sequence's last step was answered by
    // another replica: a sequence unknown here was then lost with it.
    let moved_from = moved_from.filter(|from| *from != replica.id());
    let unknown = |e: crate::sequences::SequenceError| match (moved_from, &e) {
        (Some(from), crate::sequences::SequenceError::Unknown { .. }) => (
            Outcome::InvalidInput,
            ApiError::new(
                StatusCode::GONE,
                format!(
                    "sequence {} of {model}: its state was held by replica {from}, which did not take this step (gone or ejected), and is not here{}: start the sequence again with sequence_start=true",
                    step.id,
                    if replica.session_store().is_some() {
                        " nor in the session store"
                    } else {
                        " (the memory session store keeps it in one replica; --session-store redis://… lets any replica continue)"
                    }
                ),
            ),
        ),
        _ => sequence_error(e),
    };
    let sequences = replica.sequences();
    let guard = match sequences
        .begin(&model, &step, serving.version.as_str(), initial)
        .await
    {
        // Not held here: another replica may have left it in the store.
        Err(unknown_error @ crate::sequences::SequenceError::Unknown { .. })
            if replica.session_store().is_some() =>
        {
            let store = replica.session_store().unwrap_or_else(|| unreachable!());
            match store.load(&model, &step.id).await {
                Ok(Some(saved)) => {
                    let held = crate::sequences::Held {
                        state: saved.state,
                        steps: saved.steps,
                        run: saved.run,
                    };
                    if !sequences.adopt(&model, &step.id, &saved.version, held) {
                        return Err(sequence_error(crate::sequences::SequenceError::TooMany {
                            max: sequences.limits().max,
                        }));
                    }
                    sequences
                        .begin(&model, &step, serving.version.as_str(), Vec::new)
                        .await
                        .map_err(sequence_error)?
                }
                Ok(None) => return Err(unknown(unknown_error)),
                Err(e) => {
                    return Err((
                        Outcome::Overloaded,
                        ApiError::unavailable(
                            format!(
                                "sequence {} is not held by this replica and the session store cannot be read ({e}); retry",
                                step.id
                            ),
                            1,
                        ),
                    ));
                }
            }
        }
        other => other.map_err(unknown)?,
    };
    if guard.version() != serving.version.as_str() {
        let started_on = guard.version().to_owned();
        if asked.is_some() {
            return Err((
                Outcome::InvalidInput,
                ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "sequence {} began on {model}:{started_on}; its state cannot feed version {}",
                        step.id, serving.version
                    ),
                ),
            ));
        }
        match replica.store().lookup(&model, Some(&started_on)) {
            Ok(pinned) => *serving = pinned,
            Err(_) => {
                drop(guard);
                replica.sequences().forget(&model, &step.id);
                return Err((
                    Outcome::InvalidInput,
                    ApiError::new(
                        StatusCode::GONE,
                        format!(
                            "sequence {} began on {model}:{started_on}, which this replica no longer serves, and its state cannot feed another version: start the sequence again (sequence_start=true)",
                            step.id
                        ),
                    ),
                ));
            }
        }
    }
    Ok(SequenceStep {
        guard,
        id: step.id,
        end: step.end,
    })
}

async fn run_inference(
    replica: &Replica,
    serving: &ServingVersion,
    mut request: shoal_oip::DecodedRequest,
    step: Option<SequenceStep<'_>>,
    admitted: Admitted,
) -> Result<(DecodedRequest, Vec<Tensor>), (Outcome, ApiError)> {
    let invalid = |e: String| (Outcome::InvalidInput, ApiError::bad_request(e));
    let signature = serving.loaded.signature();
    // Resolve requested outputs before running, so a typo costs no inference.
    let selected: Option<Vec<String>> = match &request.outputs {
        None => None,
        Some(wanted) => Some(
            wanted
                .iter()
                .map(|o| {
                    signature
                        .outputs
                        .iter()
                        .find(|s| s.name == o.name)
                        .map(|s| s.name.clone())
                        .ok_or_else(|| {
                            let names: Vec<String> = signature
                                .outputs
                                .iter()
                                .map(|s| format!("{:?}", s.name))
                                .collect();
                            invalid(format!(
                                "unknown output {:?}; the model's outputs are {}",
                                o.name,
                                names.join(", ")
                            ))
                        })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    // One model's requests may not take every thread from the others, and
    // none may wait or run past the replica's deadline.
    let share = shoal_runtime::Share {
        key: serving.model.as_str(),
        cap: replica
            .pool()
            .cap_for(replica.store().snapshot().models.len()),
        deadline: replica.inference_timeout(),
    };
    let inputs = std::mem::take(&mut request.inputs);
    // The admission ends when the request reaches the pool or the batcher
    // (a sequence step may run again: only its first run holds it).
    let admitted = std::sync::Mutex::new(Some(admitted));
    let run = |inputs: Vec<Tensor>| async {
        let admitted = admitted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let ran = match (&serving.batcher, admitted) {
            (Some(batcher), Some(Admitted::Batch(arrival))) => {
                batcher.run(inputs, Some(arrival)).await
            }
            (Some(batcher), _) => batcher.run(inputs, None).await,
            (None, admitted) => {
                drop(admitted);
                replica
                    .pool()
                    .run_shared(&serving.loaded, inputs, share)
                    .await
            }
        };
        ran.map_err(|e| match e {
            RunError::Input(e) => invalid(e.to_string()),
            RunError::Overloaded { .. } | RunError::Busy { .. } => {
                (Outcome::Overloaded, ApiError::unavailable(e.to_string(), 1))
            }
            RunError::DeadlineExceeded { .. } => (
                Outcome::Error,
                ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string())
                },
            ),
            RunError::Engine(cause) => (Outcome::Error, ApiError::internal(cause)),
        })
    };
    let outputs = match step {
        None => run(inputs).await?,
        Some(step) => {
            let return_state = request
                .parameters
                .as_ref()
                .and_then(|p| p.get("shoal_return_state"))
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false);
            sequence_step(replica, serving, step, inputs, return_state, run).await?
        }
    };
    let outputs: Vec<Tensor> = match selected {
        None => outputs,
        Some(names) => names
            .iter()
            .filter_map(|n| outputs.iter().find(|t| &t.name == n).cloned())
            .collect(),
    };
    Ok((request, outputs))
}

/// Runs one step of a sequence: the client's inputs with the sequence's
/// state; the new state kept for the next step (and, with a shared store,
/// written through: if another replica advanced the sequence meanwhile,
/// the step runs again on the state it left, so the answer is the one the
/// sequence's history gives). What the client gets: the outputs without
/// the state, unless `return_state`.
async fn sequence_step<F, Fut>(
    replica: &Replica,
    serving: &ServingVersion,
    step: SequenceStep<'_>,
    inputs: Vec<Tensor>,
    return_state: bool,
    run: F,
) -> Result<Vec<Tensor>, (Outcome, ApiError)>
where
    F: Fn(Vec<Tensor>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Tensor>, (Outcome, ApiError)>>,
{
    use crate::session_store::{Saved, Written};
    let SequenceStep { mut guard, id, end } = step;
    let model = serving.model.as_str();
    let state = serving.loaded.state();
    let mut reruns = 0;
    loop {
        let mut all = inputs.clone();
        // Given state (with a start) replaces the initial zeros.
        all.extend(
            guard
                .state()
                .iter()
                .filter(|t| !inputs.iter().any(|i| i.name == t.name))
                .cloned(),
        );
        let outputs = run(all).await?;
        let everything = return_state.then(|| outputs.clone());
        let (answer, next) = state
            .split(outputs)
            .map_err(|e| (Outcome::Error, ApiError::internal(e)))?;
        if let Some(store) = replica.session_store() {
            // A start replaces whatever the store holds under this id.
            let saved = Saved {
                version: guard.version().to_owned(),
                run: guard.run(),
                steps: guard.steps() + 1,
                state: next.clone(),
            };
            let written = store
                .save(model, &id, guard.steps(), guard.starts(), &saved)
                .await;
            if let Ok(Written::Ended) = written {
                drop(guard);
                replica.sequences().forget(model, &id);
                return Err(sequence_error(crate::sequences::SequenceError::Unknown {
                    model: model.to_owned(),
                    id,
                    idle_secs: replica.sequences().limits().idle.as_secs(),
                }));
            }
            if let Ok(Written::Behind) = written {
                let newer = store.load(model, &id).await.ok().flatten();
                match newer {
                    Some(newer) if reruns < 3 && newer.version == guard.version() => {
                        tracing::info!(%model, sequence = %id, here = guard.steps(), store = newer.steps, "sequence advanced on another replica; running the step on its state");
                        guard.catch_up(crate::sequences::Held {
                            state: newer.state,
                            steps: newer.steps,
                            run: newer.run,
                        });
                        replica.metrics.sequence_steps_rerun.inc();
                        reruns += 1;
                        continue;
                    }
                    _ => {
                        return Err((
                            Outcome::Error,
                            ApiError::new(
                                StatusCode::CONFLICT,
                                format!(
                                    "sequence {id} moved on elsewhere while this step ran, and its newer state cannot be read back; retry the step"
                                ),
                            ),
                        ));
                    }
                }
            }
            if end {
                let _ = store.end(model, &id).await;
            }
        }
        guard.finish(next, end);
        return Ok(everything.unwrap_or(answer));
    }
}
