//! `Ticket`: what a call that must wait for blocks (or a `flush` that must wait for writes)
//! returns instead of its answer; the waiter redeems it with `take_ticket` / `take_flush`
//! once the engine lists it as finished (`drain_notifications`), or withdraws it with
//! `cancel_ticket`.
//!
//! A frozen value compared and hashed by its number, so a finished ticket the loop drains
//! finds the waiter keyed by the ticket the call returned. It is a class of its own, not an
//! int, so a block id, a count or a sequence number cannot be passed where a ticket goes.

use ferrumkv_core::waiters::Ticket;
use pyo3::prelude::*;

#[pyclass(
    frozen,
    eq,
    hash,
    from_py_object,
    module = "ferrumkv._core",
    name = "Ticket"
)]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PyTicket {
    /// The engine's number for the waiting call.
    #[pyo3(get)]
    pub id: Ticket,
}

#[pymethods]
impl PyTicket {
    fn __repr__(&self) -> String {
        format!("Ticket({})", self.id)
    }
}
