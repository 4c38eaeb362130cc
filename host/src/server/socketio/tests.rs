//! The Socket.IO layer on its own: what it renders from the hub's items,
//! with no Engine.IO session around it.

use super::*;
use crate::hub::{SharedEvent, Slot};

fn socket() -> SioSocket {
    SioSocket::new(KeptRequest::default())
}

fn event(slot: &Slot, name: &str) -> Outbound {
    Outbound::Event {
        slot: slot.clone(),
        event: SharedEvent::new(name, "1".into()),
    }
}

fn gate(nsp: &str, generation: u64, release: bool) -> Outbound {
    Outbound::Gate(Box::new(Gate::reply(
        nsp.into(),
        generation,
        format!("40{nsp},{{\"sid\":\"x\"}}"),
        release,
    )))
}

#[test]
fn events_of_a_connecting_namespace_follow_its_reply() {
    let s = socket();
    let slot = Slot::instance("/chat");
    let g = s.hold(&"/chat".into());
    let mut out = Vec::new();
    s.render(event(&slot, "auth"), &mut out);
    assert!(out.is_empty(), "held until the reply");
    s.render(gate("/chat", g, true), &mut out);
    assert_eq!(
        out,
        vec![
            EioOut::Text("40/chat,{\"sid\":\"x\"}".into()),
            EioOut::Text("42/chat,[\"auth\",1]".into()),
        ]
    );
    assert!(!s.holds_events());
}

#[test]
fn a_refused_connect_drops_what_was_held() {
    let s = socket();
    let slot = Slot::instance("/");
    let g = s.hold(&"/".into());
    let mut out = Vec::new();
    s.render(event(&slot, "auth"), &mut out);
    s.render(gate("/", g, false), &mut out);
    assert_eq!(out.len(), 1);
    assert!(matches!(&out[0], EioOut::Text(t) if t.starts_with("40")));
}

#[test]
fn a_reply_to_an_earlier_connect_leaves_the_later_hold_in_place() {
    let s = socket();
    let slot = Slot::instance("/");
    let first = s.hold(&"/".into());
    let second = s.hold(&"/".into());
    let mut out = Vec::new();
    s.render(gate("/", first, true), &mut out);
    s.render(event(&slot, "e"), &mut out);
    assert_eq!(out.len(), 1, "the event waits for the second reply");
    s.render(gate("/", second, true), &mut out);
    assert_eq!(out.last(), Some(&EioOut::Text("42[\"e\",1]".into())));
}

#[test]
fn acks_and_ended_instances_are_framed_as_socket_io_packets() {
    let s = socket();
    let mut out = Vec::new();
    s.render(
        Outbound::Ack(Box::new(crate::hub::Ack {
            asks: false,
            instance: "/".into(),
            id: 7,
            args: "[\"ok\"]".into(),
            attachments: Vec::new(),
        })),
        &mut out,
    );
    s.render(Outbound::Ended("/chat".into()), &mut out);
    assert_eq!(
        out,
        vec![
            EioOut::Text("437[\"ok\"]".into()),
            EioOut::Text("41/chat,".into()),
        ]
    );
}

#[test]
fn events_for_an_ended_socket_are_dropped() {
    let s = socket();
    let slot = Slot::instance("/");
    slot.close();
    let mut out = Vec::new();
    s.render(event(&slot, "late"), &mut out);
    assert!(out.is_empty());
}
