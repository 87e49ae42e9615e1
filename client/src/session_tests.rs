use super::*;
use crate::BackoffConfig;
use crosswire_shared::PeerId;

fn t(name: &str) -> Topic {
    Topic::new(name).unwrap()
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).unwrap()
}

/// A session driven with fake time; `random` always answers 0.5.
struct Harness {
    s: Session,
    now: Millis,
}

impl Harness {
    fn new(config: Config) -> Self {
        Self { s: Session::new(config, Box::new(|| 0.5)), now: 1_000_000 }
    }

    fn default() -> Self {
        Self::new(Config::default())
    }

    fn input(&mut self, input: Input) -> Vec<Command> {
        self.s.handle(input, self.now)
    }

    fn at(&mut self, now: Millis, input: Input) -> Vec<Command> {
        self.now = now;
        self.input(input)
    }

    fn frame(&mut self, json: &str) -> Vec<Command> {
        self.input(Input::Frame(json.to_owned()))
    }

    /// Start (or retry), open and get welcomed as `peer`.
    fn open(&mut self, peer: &str) -> Vec<Command> {
        let mut out = Vec::new();
        if matches!(self.s.conn, Conn::Idle) {
            out.extend(self.input(Input::Start));
        }
        out.extend(self.input(Input::Opened));
        out.extend(self.frame(&format!(r#"{{"type":"welcome","peer":"{peer}","heartbeat_ms":25000,"version":1}}"#)));
        out
    }

    /// Advance to the next deadline and tick.
    fn tick_to_deadline(&mut self) -> Vec<Command> {
        let at = self.s.next_deadline().expect("a deadline");
        self.at(at, Input::Tick)
    }
}

fn sent(cmds: &[Command]) -> Vec<String> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Send(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn events(cmds: &[Command]) -> Vec<Event> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Notify(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn statuses(cmds: &[Command]) -> Vec<Status> {
    events(cmds)
        .into_iter()
        .filter_map(|e| match e {
            Event::Status(s) => Some(s),
            _ => None,
        })
        .collect()
}

fn messages(cmds: &[Command]) -> Vec<(u64, String)> {
    events(cmds)
        .into_iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some((m.seq, m.data.get().to_owned())),
            _ => None,
        })
        .collect()
}

fn acks(cmds: &[Command]) -> Vec<(u64, Result<u64, ClientError>)> {
    events(cmds)
        .into_iter()
        .filter_map(|e| match e {
            Event::Ack { id, result } => Some((id, result)),
            _ => None,
        })
        .collect()
}

fn open_status(peer: &str) -> Status {
    Status::Open { peer: PeerId::from(peer) }
}

#[test]
fn connects_opens_and_greets() {
    let mut h = Harness::default();
    let cmds = h.input(Input::Start);
    assert_eq!(cmds, vec![Command::Connect { refresh_token: false }]);
    assert_eq!(h.s.status(), &Status::Connecting { attempt: 0 });
    assert!(h.input(Input::Start).is_empty(), "start is idempotent");
    assert!(h.input(Input::Opened).is_empty());
    let cmds = h.frame(r#"{"type":"welcome","peer":"p1","heartbeat_ms":25000,"version":1}"#);
    assert_eq!(statuses(&cmds), vec![open_status("p1")]);
    assert!(h.s.status().is_open());
}

#[test]
fn heartbeat_pings_and_a_missing_pong_reconnects() {
    let mut h = Harness::default();
    h.open("p1");
    let start = h.now;
    assert_eq!(h.s.next_deadline(), Some(start + 25_000));
    let cmds = h.tick_to_deadline();
    assert_eq!(sent(&cmds), vec![r#"{"type":"ping","id":1}"#]);
    // The pong arrives: the next ping is due one interval after the last.
    h.now += 100;
    assert!(h.frame(r#"{"type":"pong","id":1}"#).is_empty());
    assert_eq!(h.s.next_deadline(), Some(start + 50_000));
    let cmds = h.tick_to_deadline();
    assert_eq!(sent(&cmds), vec![r#"{"type":"ping","id":2}"#]);
    // No pong this time: after the pong timeout the socket is declared dead.
    assert_eq!(h.s.next_deadline(), Some(start + 60_000));
    let cmds = h.tick_to_deadline();
    assert_eq!(cmds[0], Command::CloseSocket { code: 3008, reason: "no pong from the server".into() });
    let st = statuses(&cmds);
    assert!(matches!(st[..], [Status::Reconnecting { attempt: 1, code: Some(3008), .. }]), "{st:?}");
}

#[test]
fn a_stale_pong_does_not_satisfy_the_heartbeat() {
    let mut h = Harness::new(Config { heartbeat_ms: Some(1_000), ..Config::default() });
    h.open("p1");
    h.tick_to_deadline(); // ping 1
    h.frame(r#"{"type":"pong","id":99}"#);
    let cmds = h.tick_to_deadline();
    assert!(matches!(cmds[0], Command::CloseSocket { code: 3008, .. }));
}

#[test]
fn heartbeat_can_be_disabled() {
    let mut h = Harness::new(Config { heartbeat_ms: Some(0), ..Config::default() });
    h.open("p1");
    assert_eq!(h.s.next_deadline(), None);
}

#[test]
fn going_away_reconnects_with_backoff_and_refreshes_the_token() {
    let mut h = Harness::default();
    h.open("p1");
    let cmds = h.input(Input::Closed { code: 1001, reason: "shutdown".into() });
    let retry_at = h.now + BackoffConfig::default().delay(1, 0.5);
    assert_eq!(statuses(&cmds), vec![Status::Reconnecting { attempt: 1, retry_at, code: Some(1001) }]);
    assert_eq!(h.s.next_deadline(), Some(retry_at));
    // Nothing happens before the retry time.
    assert!(h.at(retry_at - 1, Input::Tick).is_empty());
    let cmds = h.at(retry_at, Input::Tick);
    assert_eq!(cmds[0], Command::Connect { refresh_token: true });
    assert_eq!(statuses(&cmds), vec![Status::Connecting { attempt: 1 }]);
}

#[test]
fn failures_back_off_further_and_reset_only_after_min_uptime() {
    let mut h = Harness::default();
    h.open("p1");
    let mut delays = Vec::new();
    for _ in 0..4 {
        let before = h.now;
        h.input(Input::Closed { code: 1006, reason: String::new() });
        let Status::Reconnecting { retry_at, .. } = *h.s.status() else { panic!("{:?}", h.s.status()) };
        delays.push(retry_at - before);
        h.at(retry_at, Input::Tick);
        // Opens and is welcomed, but drops within the minimum uptime.
        h.open("p1");
        h.now += 4_999;
    }
    let cfg = BackoffConfig::default();
    assert_eq!(delays, (1..=4).map(|n| cfg.delay(n, 0.5)).collect::<Vec<_>>());
    // This time it stays up long enough: the next delay is the first again.
    h.now += 1;
    h.input(Input::Closed { code: 1006, reason: String::new() });
    assert!(matches!(h.s.status(), Status::Reconnecting { attempt: 1, .. }));
}

#[test]
fn policy_closes_do_not_reconnect_unless_asked() {
    for (code, want) in [
        (4001, Status::Unauthorized { retry_at: None }),
        (4003, Status::Forbidden { retry_at: None }),
        (4000, Status::Closed { code: Some(4000), reason: "bye".into() }),
        (1008, Status::Closed { code: Some(1008), reason: "bye".into() }),
    ] {
        let mut h = Harness::default();
        h.open("p1");
        let cmds = h.input(Input::Closed { code, reason: "bye".into() });
        assert_eq!(statuses(&cmds), vec![want]);
        assert_eq!(h.s.next_deadline(), None, "close code {code}");
        h.now += 3_600_000;
        assert!(h.input(Input::Tick).is_empty());
        assert!(h.input(Input::Online).is_empty());
        let cmds = h.input(Input::Reconnect);
        assert_eq!(cmds[0], Command::Connect { refresh_token: true });
    }
}

#[test]
fn other_server_close_codes_reconnect() {
    for code in [1001, 1006, 1009, 1011, 1013, 3008] {
        let mut h = Harness::default();
        h.open("p1");
        h.input(Input::Closed { code, reason: String::new() });
        assert!(matches!(h.s.status(), Status::Reconnecting { .. }), "close code {code}");
    }
}

#[test]
fn a_refused_handshake_is_probed_and_401_retries_only_at_max_backoff() {
    let mut h = Harness::default();
    h.input(Input::Start);
    let cmds = h.input(Input::Closed { code: 1006, reason: String::new() });
    assert_eq!(cmds, vec![Command::Probe]);
    let cmds = h.input(Input::Probed(Some(401)));
    let retry_at = h.now + 20_000;
    assert_eq!(statuses(&cmds), vec![Status::Unauthorized { retry_at: Some(retry_at) }]);
    // Going online or visible does not short-cut an auth wait.
    assert!(h.input(Input::Online).is_empty());
    assert!(h.input(Input::Visibility { hidden: false }).is_empty());
    let cmds = h.at(retry_at, Input::Tick);
    assert_eq!(cmds[0], Command::Connect { refresh_token: true });
    // Forbidden the same way.
    let cmds = h.input(Input::Closed { code: 1006, reason: String::new() });
    assert_eq!(cmds, vec![Command::Probe]);
    let cmds = h.input(Input::Probed(Some(403)));
    assert_eq!(statuses(&cmds), vec![Status::Forbidden { retry_at: Some(h.now + 20_000) }]);
}

#[test]
fn other_probe_results_back_off_normally() {
    for result in [Some(426), Some(502), None] {
        let mut h = Harness::default();
        h.input(Input::Start);
        h.input(Input::Closed { code: 1006, reason: String::new() });
        let cmds = h.input(Input::Probed(result));
        assert!(matches!(statuses(&cmds)[..], [Status::Reconnecting { attempt: 1, .. }]), "{result:?}");
    }
    // A probe that never answers times out into a normal retry.
    let mut h = Harness::default();
    h.input(Input::Start);
    h.input(Input::Closed { code: 1006, reason: String::new() });
    assert_eq!(h.s.next_deadline(), Some(h.now + 10_000));
    h.tick_to_deadline();
    assert!(matches!(h.s.status(), Status::Reconnecting { .. }));
}

#[test]
fn connect_timeout_gives_up_on_the_socket() {
    let mut h = Harness::default();
    h.input(Input::Start);
    assert_eq!(h.s.next_deadline(), Some(h.now + 10_000));
    let cmds = h.tick_to_deadline();
    assert_eq!(cmds[0], Command::CloseSocket { code: 1000, reason: "connect timeout".into() });
    assert!(matches!(h.s.status(), Status::Reconnecting { attempt: 1, .. }));
    // Opened but never welcomed counts too.
    let cmds = h.tick_to_deadline();
    assert_eq!(cmds[0], Command::Connect { refresh_token: true });
    h.input(Input::Opened);
    let cmds = h.tick_to_deadline();
    assert!(matches!(cmds[0], Command::CloseSocket { .. }));
    // Events of a forgotten socket are ignored.
    assert!(h.input(Input::Closed { code: 1006, reason: String::new() }).is_empty());
    assert!(h.frame(r#"{"type":"welcome","peer":"p","heartbeat_ms":1,"version":1}"#).is_empty());
}

#[test]
fn deliberate_close_stops_everything_and_fails_waiting_acks() {
    let mut h = Harness::default();
    h.input(Input::Start);
    let id = h.s.next_id();
    h.input(Input::Publish { topic: t("a"), data: raw("1"), ack: Some(id) });
    let cmds = h.input(Input::Close);
    assert_eq!(cmds[0], Command::CloseSocket { code: 1000, reason: "closed by the app".into() });
    assert_eq!(acks(&cmds), vec![(id, Err(ClientError::Closed))]);
    assert!(matches!(h.s.status(), Status::Closed { code: Some(1000), .. }));
    assert_eq!(h.s.next_deadline(), None);
    // Publishing after close fails at once instead of queueing forever.
    let id = h.s.next_id();
    let cmds = h.input(Input::Publish { topic: t("a"), data: raw("2"), ack: Some(id) });
    assert_eq!(acks(&cmds), vec![(id, Err(ClientError::Closed))]);
    assert_eq!(h.s.queued(), 0);
}

#[test]
fn explicit_reconnect_replaces_the_socket_and_resets_backoff() {
    let mut h = Harness::default();
    h.open("p1");
    let cmds = h.input(Input::Reconnect);
    assert_eq!(cmds[0], Command::CloseSocket { code: 1000, reason: "reconnecting".into() });
    assert!(cmds.contains(&Command::Connect { refresh_token: true }));
    assert_eq!(h.s.status(), &Status::Connecting { attempt: 0 });
}

#[test]
fn hidden_pages_pause_retries_and_online_or_visible_retries_at_once() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Visibility { hidden: true });
    h.input(Input::Closed { code: 1006, reason: String::new() });
    assert!(matches!(h.s.status(), Status::Reconnecting { .. }));
    assert_eq!(h.s.next_deadline(), None, "paused while hidden");
    h.now += 60_000;
    assert!(h.input(Input::Tick).is_empty());
    let cmds = h.input(Input::Visibility { hidden: false });
    assert_eq!(cmds[0], Command::Connect { refresh_token: true });
    // Online short-cuts a scheduled retry as well.
    h.input(Input::Opened);
    h.input(Input::Closed { code: 1006, reason: String::new() });
    assert!(matches!(h.s.status(), Status::Reconnecting { .. }));
    let cmds = h.input(Input::Online);
    assert_eq!(cmds[0], Command::Connect { refresh_token: true });
}

#[test]
fn subscriptions_are_shared_and_the_last_unsubscribe_sends() {
    let mut h = Harness::default();
    h.open("p1");
    let cmds = h.input(Input::Subscribe { topic: t("a"), presence: false });
    assert_eq!(sent(&cmds), vec![r#"{"type":"subscribe","topic":"a"}"#]);
    assert!(sent(&h.input(Input::Subscribe { topic: t("a"), presence: false })).is_empty());
    assert!(sent(&h.input(Input::Unsubscribe { topic: t("a"), presence: false })).is_empty());
    assert_eq!(
        sent(&h.input(Input::Unsubscribe { topic: t("a"), presence: false })),
        vec![r#"{"type":"unsubscribe","topic":"a"}"#]
    );
    assert_eq!(h.s.topic_status(&t("a")), None);
    // Unknown topics are ignored.
    assert!(h.input(Input::Unsubscribe { topic: t("zzz"), presence: false }).is_empty());
}

#[test]
fn subscribes_made_offline_are_sent_on_welcome() {
    let mut h = Harness::default();
    h.input(Input::Subscribe { topic: t("b"), presence: false });
    h.input(Input::Subscribe { topic: t("a"), presence: true });
    let cmds = h.open("p1");
    assert_eq!(
        sent(&cmds),
        vec![r#"{"type":"subscribe","topic":"a","presence":true}"#, r#"{"type":"subscribe","topic":"b"}"#]
    );
}

fn subscribed(h: &mut Harness, topic: &str, epoch: &str, seq: u64, recovered: bool) -> Vec<Command> {
    h.frame(&format!(
        r#"{{"type":"subscribed","topic":"{topic}","epoch":"{epoch}","seq":{seq},"recovered":{recovered}}}"#
    ))
}

fn message(h: &mut Harness, topic: &str, seq: u64, data: &str) -> Vec<Command> {
    h.frame(&format!(r#"{{"type":"message","topic":"{topic}","seq":{seq},"from":"p9","data":{data}}}"#))
}

#[test]
fn resubscribes_every_topic_with_since_after_reconnect() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    h.input(Input::Subscribe { topic: t("b"), presence: false });
    h.input(Input::Subscribe { topic: t("c"), presence: false });
    subscribed(&mut h, "a", "E1", 10, false);
    subscribed(&mut h, "b", "E2", 0, false);
    // "c" never got its `subscribed`: no position to resume from.
    message(&mut h, "a", 11, "1");
    message(&mut h, "a", 12, "2");
    assert_eq!(h.s.since(&t("a")), Some(Since { epoch: "E1".into(), seq: 12 }));
    let cmds = h.input(Input::Closed { code: 1006, reason: String::new() });
    let topic_events: Vec<_> = events(&cmds).into_iter().filter(|e| matches!(e, Event::Topic { .. })).collect();
    assert_eq!(topic_events.len(), 2, "a and b go back to subscribing; c already was");
    h.tick_to_deadline();
    let cmds = h.open("p2");
    assert_eq!(
        sent(&cmds),
        vec![
            r#"{"type":"subscribe","topic":"a","since":{"epoch":"E1","seq":12}}"#,
            r#"{"type":"subscribe","topic":"b","since":{"epoch":"E2","seq":0}}"#,
            r#"{"type":"subscribe","topic":"c"}"#,
        ]
    );
}

#[test]
fn recovery_replays_without_duplicates() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E1", 0, false);
    assert_eq!(messages(&message(&mut h, "a", 1, r#""m1""#)), vec![(1, r#""m1""#.to_owned())]);
    assert_eq!(messages(&message(&mut h, "a", 2, r#""m2""#)), vec![(2, r#""m2""#.to_owned())]);
    h.input(Input::Closed { code: 1013, reason: "slow".into() });
    h.tick_to_deadline();
    h.open("p2");
    let cmds = subscribed(&mut h, "a", "E1", 4, true);
    assert_eq!(
        events(&cmds),
        vec![Event::Topic { topic: t("a"), status: TopicStatus::Live { epoch: "E1".into(), recovered: true } }]
    );
    // The replay overlaps what was seen: seen seqs are dropped, the rest delivered once.
    let mut got = Vec::new();
    for seq in [2, 3, 4, 3, 5, 5] {
        got.extend(messages(&message(&mut h, "a", seq, &seq.to_string())));
    }
    assert_eq!(got, vec![(3, "3".into()), (4, "4".into()), (5, "5".into())]);
}

#[test]
fn an_unrecoverable_gap_is_reported() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E1", 5, false);
    h.input(Input::Closed { code: 1001, reason: String::new() });
    h.tick_to_deadline();
    h.open("p2");
    // Same epoch, the server moved on, and it could not replay.
    let cmds = subscribed(&mut h, "a", "E1", 9, false);
    let since = Since { epoch: "E1".into(), seq: 5 };
    assert_eq!(
        events(&cmds),
        vec![
            Event::Error(ClientError::Gap { topic: t("a"), epoch: "E1".into(), after_seq: 5 }),
            Event::Topic { topic: t("a"), status: TopicStatus::Gap { epoch: "E1".into(), missed_after: since } },
        ]
    );
    assert!(h.s.topic_status(&t("a")).unwrap().is_live());
    // Live messages continue after the server's seq.
    assert!(messages(&message(&mut h, "a", 9, "0")).is_empty());
    assert_eq!(messages(&message(&mut h, "a", 10, "0")).len(), 1);
}

#[test]
fn a_new_epoch_resets_tracking() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E1", 50, false);
    message(&mut h, "a", 51, "0");
    h.input(Input::Closed { code: 1001, reason: String::new() });
    h.tick_to_deadline();
    h.open("p2");
    // The server restarted: new epoch, its seqs start over.
    let cmds = subscribed(&mut h, "a", "E2", 0, false);
    assert!(events(&cmds).iter().any(|e| matches!(e, Event::Error(ClientError::Gap { after_seq: 51, .. }))));
    assert_eq!(messages(&message(&mut h, "a", 1, "1")), vec![(1, "1".into())]);
    assert_eq!(h.s.since(&t("a")), Some(Since { epoch: "E2".into(), seq: 1 }));
}

#[test]
fn nothing_missed_is_no_gap_even_without_recovery() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E1", 3, false);
    // Our own acknowledged publish got seq 4; others never saw more.
    let id = h.s.next_id();
    h.input(Input::Publish { topic: t("a"), data: raw("1"), ack: Some(id) });
    h.frame(&format!(r#"{{"type":"ack","ack":{id},"seq":4}}"#));
    h.input(Input::Closed { code: 1001, reason: String::new() });
    h.tick_to_deadline();
    h.open("p2");
    let cmds = subscribed(&mut h, "a", "E1", 4, false);
    assert_eq!(
        events(&cmds),
        vec![Event::Topic { topic: t("a"), status: TopicStatus::Live { epoch: "E1".into(), recovered: false } }]
    );
}

#[test]
fn own_messages_in_a_replay_are_not_delivered() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E1", 0, false);
    let id = h.s.next_id();
    h.input(Input::Publish { topic: t("a"), data: raw("1"), ack: Some(id) });
    h.frame(&format!(r#"{{"type":"ack","ack":{id},"seq":1}}"#));
    h.input(Input::Closed { code: 1001, reason: String::new() });
    h.tick_to_deadline();
    let cmds = h.open("p2");
    assert_eq!(sent(&cmds), vec![r#"{"type":"subscribe","topic":"a","since":{"epoch":"E1","seq":0}}"#]);
    subscribed(&mut h, "a", "E1", 2, true);
    assert!(messages(&message(&mut h, "a", 1, "1")).is_empty(), "our own publish, replayed");
    assert_eq!(messages(&message(&mut h, "a", 2, "2")), vec![(2, "2".into())]);
}

#[test]
fn offline_publishes_queue_and_flush_in_order_after_resubscribing() {
    let mut h = Harness::new(Config { queue_capacity: 3, ..Config::default() });
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    let ids: Vec<u64> = (0..4).map(|_| h.s.next_id()).collect();
    let mut cmds = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        cmds.extend(h.input(Input::Publish { topic: t("a"), data: raw(&i.to_string()), ack: Some(*id) }));
    }
    // The fourth publish evicted the first, and said so.
    let overflow = ClientError::QueueOverflow { topic: t("a") };
    assert_eq!(events(&cmds), vec![Event::Ack { id: ids[0], result: Err(overflow.clone()) }, Event::Error(overflow)]);
    assert_eq!(h.s.queued(), 3);
    // Queued time does not count against the ack timeout.
    h.now += 60_000;
    assert!(acks(&h.input(Input::Tick)).is_empty());
    let cmds = h.open("p1");
    let ack_ids = &ids[1..];
    assert_eq!(
        sent(&cmds),
        vec![
            r#"{"type":"subscribe","topic":"a"}"#.to_owned(),
            format!(r#"{{"type":"publish","topic":"a","data":1,"ack":{}}}"#, ack_ids[0]),
            format!(r#"{{"type":"publish","topic":"a","data":2,"ack":{}}}"#, ack_ids[1]),
            format!(r#"{{"type":"publish","topic":"a","data":3,"ack":{}}}"#, ack_ids[2]),
        ]
    );
    assert_eq!(h.s.queued(), 0);
    // Their acks resolve after the flush.
    let cmds = h.frame(&format!(r#"{{"type":"ack","ack":{},"seq":7}}"#, ack_ids[0]));
    assert_eq!(acks(&cmds), vec![(ack_ids[0], Ok(7))]);
    let cmds =
        h.frame(&format!(r#"{{"type":"error","code":"rate_limited","message":"slow down","ack":{}}}"#, ack_ids[1]));
    let refused = ClientError::Server { code: ErrorCode::RateLimited, message: "slow down".into(), topic: None };
    assert_eq!(acks(&cmds), vec![(ack_ids[1], Err(refused))]);
    // The third times out.
    let cmds = h.at(h.now + 10_000, Input::Tick);
    assert_eq!(acks(&cmds), vec![(ack_ids[2], Err(ClientError::AckTimeout(10_000)))]);
}

#[test]
fn acks_in_flight_fail_when_the_connection_drops() {
    let mut h = Harness::default();
    h.open("p1");
    let id = h.s.next_id();
    let cmds = h.input(Input::Publish { topic: t("a"), data: raw("{}"), ack: Some(id) });
    assert_eq!(sent(&cmds), vec![format!(r#"{{"type":"publish","topic":"a","data":{{}},"ack":{id}}}"#)]);
    let cmds = h.input(Input::Closed { code: 1006, reason: String::new() });
    assert_eq!(acks(&cmds), vec![(id, Err(ClientError::Disconnected))]);
}

#[test]
fn refused_subscriptions_and_bad_frames_are_reported() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("secret"), presence: false });
    let cmds = h.frame(r#"{"type":"error","code":"forbidden","message":"no","topic":"secret"}"#);
    let err = ClientError::Server { code: ErrorCode::Forbidden, message: "no".into(), topic: Some(t("secret")) };
    assert_eq!(
        events(&cmds),
        vec![Event::Topic { topic: t("secret"), status: TopicStatus::Refused(err.clone()) }, Event::Error(err)]
    );
    let cmds = h.frame("not json");
    assert!(matches!(events(&cmds)[..], [Event::Error(ClientError::Protocol(_))]));
    // Messages for topics we do not hold are ignored.
    assert!(message(&mut h, "other", 1, "1").is_empty());
}

#[test]
fn presence_snapshot_then_joins_and_leaves() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E", 0, false);
    // A second subscriber wants presence: re-subscribe with it, then ask.
    let cmds = h.input(Input::Subscribe { topic: t("a"), presence: true });
    assert_eq!(sent(&cmds), vec![r#"{"type":"subscribe","topic":"a","presence":true}"#]);
    let cmds = subscribed(&mut h, "a", "E", 0, false);
    assert_eq!(sent(&cmds), vec![r#"{"type":"presence","topic":"a","id":1}"#]);
    // Joins before the snapshot are covered by it.
    assert!(h.frame(r#"{"type":"join","topic":"a","peer":"p0"}"#).is_empty());
    let cmds = h.frame(r#"{"type":"presence","topic":"a","id":1,"peers":[{"peer":"p1"},{"peer":"p2","user":"u2"}]}"#);
    assert_eq!(events(&cmds).len(), 1);
    h.frame(r#"{"type":"join","topic":"a","peer":"p3"}"#);
    assert!(h.frame(r#"{"type":"join","topic":"a","peer":"p3"}"#).is_empty(), "no duplicates");
    let cmds = h.frame(r#"{"type":"leave","topic":"a","peer":"p2","user":"u2"}"#);
    let peers: Vec<_> = h.s.presence(&t("a")).unwrap().iter().map(|p| p.peer.as_str()).collect();
    assert_eq!(peers, ["p1", "p3"]);
    assert!(matches!(&events(&cmds)[..], [Event::Presence { peers, .. }] if peers.len() == 2));
}

#[test]
fn live_subscribe_updates_do_not_lose_position() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E", 3, false);
    message(&mut h, "a", 4, "4");
    h.input(Input::Subscribe { topic: t("a"), presence: true });
    // The server's answer can only name a seq we have already seen.
    subscribed(&mut h, "a", "E", 4, false);
    assert_eq!(h.s.since(&t("a")), Some(Since { epoch: "E".into(), seq: 4 }));
    assert_eq!(messages(&message(&mut h, "a", 5, "5")).len(), 1);
}

#[test]
fn presence_is_forgotten_when_the_connection_drops_and_asked_again_after() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: true });
    subscribed(&mut h, "a", "E", 0, false);
    h.frame(r#"{"type":"presence","topic":"a","id":1,"peers":[{"peer":"p1"},{"peer":"p2"}]}"#);
    let cmds = h.input(Input::Closed { code: 1006, reason: String::new() });
    assert!(events(&cmds).contains(&Event::Presence { topic: t("a"), peers: vec![] }));
    assert_eq!(h.s.presence(&t("a")), None);
    h.tick_to_deadline();
    let cmds = h.open("p3");
    assert_eq!(sent(&cmds), vec![r#"{"type":"subscribe","topic":"a","since":{"epoch":"E","seq":0},"presence":true}"#]);
    let cmds = subscribed(&mut h, "a", "E", 0, true);
    assert_eq!(sent(&cmds), vec![r#"{"type":"presence","topic":"a","id":2}"#]);
}

#[test]
fn payloads_that_do_not_fit_the_type_are_errors_not_panics() {
    #[derive(Debug, serde::Deserialize)]
    struct Chat {
        #[allow(dead_code)]
        text: String,
    }
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E", 0, false);
    let cmds = message(&mut h, "a", 1, "42");
    let [Event::Message(m)] = &events(&cmds)[..] else { panic!("{cmds:?}") };
    let err = m.decode::<Chat>().unwrap_err();
    assert!(matches!(&err, ClientError::Payload { seq: 1, .. }), "{err:?}");
    assert!(
        err.to_string().starts_with("message 1 on a does not match the expected type: invalid type: integer `42`"),
        "{err}"
    );
    let cmds = message(&mut h, "a", 2, r#"{"text":"hi"}"#);
    let [Event::Message(m)] = &events(&cmds)[..] else { panic!("{cmds:?}") };
    assert!(m.decode::<Chat>().is_ok());
}
