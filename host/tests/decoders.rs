//! The protocol decoders never panic on hostile input, and what they accept
//! keeps their invariants. A deterministic mutation run over seed packets
//! (the coverage-guided targets in `fuzz/` go further).

use chanhost::protocol::engineio::{decode_payload, Packet};
use chanhost::protocol::misskey;
use chanhost::protocol::socketio::{self, count_placeholders};

const SEEDS: &[&str] = &[
    "0",
    r#"0/admin,{"token":"123"}"#,
    r#"2["foo","bar"]"#,
    r#"2/admin,12["bar",{"a":[1,2,{"b":null}]}]"#,
    r#"3/admin,13["bar"]"#,
    r#"51-["baz",{"_placeholder":true,"num":0}]"#,
    r#"62-/admin,15[{"_placeholder":true,"num":0},{"x":{"_placeholder":true,"num":1}}]"#,
    r#"4{"message":"x"}"#,
    "1/admin,",
    r#"{"type":"connect","body":{"channel":"main","id":"1","params":{"a":1},"pong":true}}"#,
    r#"{"type":"ch","body":{"id":"1","type":"x","body":[1,"2"]}}"#,
    "4hello\u{1e}2\u{1e}bAQI=",
    // Found by the fuzzer: a number past f64's range in a plain event.
    "2[2,[2,2e2622],2]",
];

const ALPHABET: &[u8] = b"0123456789-/,[]{}\":_placeholdernumtrue \x1eb=+abc\\";

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &str) -> String {
    let mut b: Vec<u8> = seed.as_bytes().to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(4) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b.remove(i);
            }
            1 => {
                let i = rng.below(b.len() + 1);
                b.insert(i, ALPHABET[rng.below(ALPHABET.len())]);
            }
            2 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = ALPHABET[rng.below(ALPHABET.len())];
            }
            _ => {
                let cut = rng.below(b.len() + 1);
                b.truncate(cut);
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

#[test]
fn mutated_packets_never_panic_and_keep_invariants() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut accepted = 0;
    for i in 0..200_000 {
        let s = mutate(&mut rng, SEEDS[i % SEEDS.len()]);
        if let Ok(p) = socketio::decode(&s) {
            accepted += 1;
            let placeholders = match (&p.data, &p.event) {
                (_, Some(ev)) => match serde_json::from_str::<serde_json::Value>(&ev.args) {
                    Ok(args) => {
                        assert!(args.is_array(), "{s:?}");
                        count_placeholders(&args)
                    }
                    // Numbers past f64's range: valid JSON that serde's tree
                    // refuses; only plain events (no placeholders) carry them.
                    Err(_) => {
                        let _: Vec<&serde_json::value::RawValue> = serde_json::from_str(&ev.args)
                            .expect("event arguments are a JSON array");
                        0
                    }
                },
                (Some(data), None) => count_placeholders(data),
                (None, None) => 0,
            };
            assert_eq!(placeholders, p.attachments, "{s:?}");
        }
        if let Ok(p) = Packet::decode_text(&s) {
            assert_eq!(Packet::decode_text(&p.encode()).as_ref(), Ok(&p), "{s:?}");
        }
        let _ = decode_payload(&s);
        let _ = misskey::parse(&s);
    }
    assert!(
        accepted > 1000,
        "mutations too destructive: {accepted} accepted"
    );
}
