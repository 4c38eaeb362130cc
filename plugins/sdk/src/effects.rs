//! Effects gathered while a batch runs (`messages`, `events`): kept in the
//! plugin's memory and given to the host in one `apply` call when the
//! batch ends, when they reach [`LIMIT`], or before a host call that
//! answers or changes what later effects mean (so order holds). Outside a
//! batch every effect is a host call of its own. A batch that traps loses
//! what it gathered: the host gives its messages again one by one.

use std::cell::RefCell;

use crate::chanhost::plugin::host as raw;
use crate::types::Effect;

/// Effects gathered before they are applied anyway, bounding the memory a
/// long batch holds.
const LIMIT: usize = 256;

thread_local! {
    /// `Some` while a batch runs.
    static GATHERED: RefCell<Option<Vec<Effect>>> = const { RefCell::new(None) };
}

/// Runs a batch with its effects gathered, and applies them at its end.
pub(crate) fn gathered(batch: impl FnOnce()) {
    GATHERED.with(|g| *g.borrow_mut() = Some(Vec::new()));
    batch();
    flush();
    GATHERED.with(|g| *g.borrow_mut() = None);
}

/// Keeps `effect` for the batch's `apply` while a batch runs; gives it
/// back otherwise, for a host call of its own.
pub(crate) fn gather(effect: impl FnOnce() -> Effect) -> bool {
    let full = GATHERED.with(|g| match g.borrow_mut().as_mut() {
        Some(effects) => {
            effects.push(effect());
            Some(effects.len() >= LIMIT)
        }
        None => None,
    });
    match full {
        Some(true) => {
            flush();
            true
        }
        Some(false) => true,
        None => false,
    }
}

/// Applies what was gathered, if anything.
pub(crate) fn flush() {
    let effects = GATHERED.with(|g| g.borrow_mut().as_mut().map(std::mem::take));
    if let Some(effects) = effects.filter(|e| !e.is_empty()) {
        raw::apply(&effects);
    }
}
