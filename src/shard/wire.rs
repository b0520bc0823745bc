//! How a `ShardCall` and its answer travel between nodes: JSON inside the consensus module's
//! authenticated peer frames (`Consensus::call`). A call goes as the `Shard` request of the
//! node's peer messages (which `src/cluster.rs` decodes, handing the call to `serve_call`); the
//! answer is the JSON of `Result<ShardAnswer, ShardError>`.

use serde::Serialize;

use super::ShardError;
use super::routing::{ShardAnswer, ShardCall};

/// A shard call as a peer request: `{"Shard": call}`, the `Shard` variant of the node's peer
/// messages (`PeerMessage` in `src/cluster.rs`, which decodes it; tested there).
#[derive(Serialize)]
enum ShardRequest<'a> {
    Shard(&'a ShardCall),
}

pub fn encode_shard_call(call: &ShardCall) -> Vec<u8> {
    serde_json::to_vec(&ShardRequest::Shard(call)).expect("shard calls serialize")
}

pub fn encode_shard_answer(answer: &Result<ShardAnswer, ShardError>) -> Vec<u8> {
    serde_json::to_vec(answer).expect("answers serialize")
}

pub fn decode_shard_answer(bytes: &[u8]) -> Result<ShardAnswer, ShardError> {
    serde_json::from_slice::<Result<ShardAnswer, ShardError>>(bytes).unwrap_or_else(|error| {
        Err(ShardError::Unavailable(format!(
            "undecodable answer from the leader: {error}"
        )))
    })
}
