//! The agent engine: how FleetLM talks to agents. So far its pure parts: the reply line parser
//! (JSONL, SSE, legacy lines) and the AI SDK stream assembler with its partial-JSON parser.
//! Scheduling and the webhook client (issue 4) build on them.

pub mod assembler;
mod partial_json;
pub mod reply;
