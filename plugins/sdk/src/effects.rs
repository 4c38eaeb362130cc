//! Effects gathered while a batch runs (`messages`, `events`): packed in
//! the plugin's memory (see [`crate::packing`]) and given to the host in
//! one `apply-packed` call when the batch ends, when they reach [`LIMIT`],
//! or before a host call that answers or changes what later effects mean
//! (so order holds). Outside a batch every effect is a host call of its
//! own. A batch that traps loses what it gathered: the host gives its
//! messages again one by one. The buffers are kept from batch to batch.

use std::cell::RefCell;

use crate::chanhost::plugin::host as raw;
use crate::packing::Packer;
use crate::types::EffectBatch;

/// Effects gathered before they are applied anyway, bounding the memory a
/// long batch holds.
const LIMIT: usize = 256;

struct Gathered {
    /// Whether a batch runs.
    on: bool,
    effects: usize,
    packer: Packer,
    attachments: Vec<Vec<u8>>,
}

thread_local! {
    static GATHERED: RefCell<Gathered> = const {
        RefCell::new(Gathered {
            on: false,
            effects: 0,
            packer: Packer { text: Vec::new(), words: Vec::new() },
            attachments: Vec::new(),
        })
    };
}

/// Runs a batch with its effects gathered, and applies them at its end.
pub(crate) fn gathered(batch: impl FnOnce()) {
    GATHERED.with(|g| g.borrow_mut().on = true);
    batch();
    flush();
    GATHERED.with(|g| g.borrow_mut().on = false);
}

/// Packs an effect (`write` writes its words, given the attachments to
/// add) while a batch runs; false otherwise (the caller makes the host
/// call itself).
pub(crate) fn gather(attachments: &[Vec<u8>], write: impl FnOnce(&mut Packer)) -> bool {
    let full = GATHERED.with(|g| {
        let mut g = g.borrow_mut();
        if !g.on {
            return None;
        }
        let g = &mut *g;
        write(&mut g.packer);
        g.attachments.extend_from_slice(attachments);
        g.effects += 1;
        Some(g.effects >= LIMIT)
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

/// Applies what was gathered, if anything; the buffers are kept.
pub(crate) fn flush() {
    GATHERED.with(|g| {
        let mut g = g.borrow_mut();
        if g.effects == 0 {
            return;
        }
        let g = &mut *g;
        let batch = EffectBatch {
            text: std::mem::take(&mut g.packer.text),
            words: std::mem::take(&mut g.packer.words),
            attachments: std::mem::take(&mut g.attachments),
        };
        raw::apply_packed(&batch);
        // The buffers go back, emptied, for the next batch.
        let EffectBatch {
            mut text,
            mut words,
            mut attachments,
        } = batch;
        text.clear();
        words.clear();
        attachments.clear();
        g.packer = Packer { text, words };
        g.attachments = attachments;
        g.effects = 0;
    });
}
