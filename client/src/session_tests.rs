//! The session's tests: inputs and fake time in, commands out.

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
    fn new(config: ClientConfig) -> Self {
        Self { s: Session::new(config, Box::new(|| 0.5)), now: 1_000_000 }
    }

    fn default() -> Self {
        Self::new(ClientConfig::default())
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
    assert_eq!(cmds, vec![Command::Connect { token: None }]);
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
    let mut h = Harness::new(ClientConfig { heartbeat_ms: Some(1_000), ..ClientConfig::default() });
    h.open("p1");
    h.tick_to_deadline(); // ping 1
    h.frame(r#"{"type":"pong","id":99}"#);
    let cmds = h.tick_to_deadline();
    assert!(matches!(cmds[0], Command::CloseSocket { code: 3008, .. }));
}

#[test]
fn heartbeat_can_be_disabled() {
    let mut h = Harness::new(ClientConfig { heartbeat_ms: Some(0), ..ClientConfig::default() });
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
    assert_eq!(cmds[0], Command::Connect { token: None });
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
        (4001, Status::Unauthorized { retry_at: None, reason: Some("bye".into()) }),
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
        assert_eq!(cmds[0], Command::Connect { token: None });
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

/// A session whose random source answers `values` in turn, then 0.5.
fn with_random(values: Vec<f64>) -> Harness {
    let mut values = values.into_iter();
    Harness { s: Session::new(ClientConfig::default(), Box::new(move || values.next().unwrap_or(0.5))), now: 1_000_000 }
}

#[test]
fn a_restart_reconnects_at_once_jittered_within_a_second() {
    for (r, want) in [(0.0, 0), (0.25, 250), (0.5, 500), (0.999, 999), (1.0, 1000)] {
        let mut h = with_random(vec![r]);
        h.open("p1");
        // Well past the minimum uptime, so no earlier failure counts.
        h.now += 60_000;
        let cmds = h.input(Input::Closed { code: close_code::SERVICE_RESTART, reason: "server restarting".into() });
        let retry_at = h.now + want;
        let code = Some(close_code::SERVICE_RESTART);
        assert_eq!(statuses(&cmds), vec![Status::Reconnecting { attempt: 0, retry_at, code }], "r = {r}");
        assert!(want <= 1_000 && h.s.next_deadline() == Some(retry_at));
        if want > 0 {
            assert!(h.at(retry_at - 1, Input::Tick).is_empty(), "nothing before the jittered time");
        }
        let cmds = h.at(retry_at, Input::Tick);
        assert_eq!(cmds[0], Command::Connect { token: None });
        assert_eq!(statuses(&cmds), vec![Status::Connecting { attempt: 0 }]);
    }
}

#[test]
fn a_restart_does_not_escalate_the_backoff_and_resubscribes_with_since() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E1", 10, false);
    message(&mut h, "a", 11, "1");
    // A failure first: the next ordinary retry would be attempt 2.
    h.input(Input::Closed { code: 1006, reason: String::new() });
    h.tick_to_deadline();
    h.open("p2");
    h.now += 60_000;
    let cmds = h.input(Input::Closed { code: close_code::SERVICE_RESTART, reason: String::new() });
    let Status::Reconnecting { attempt, retry_at, .. } = statuses(&cmds)[0] else { panic!("{cmds:?}") };
    assert_eq!((attempt, retry_at - h.now), (0, 500), "up long enough: the counter reset, and the 1012 did not count");
    h.at(retry_at, Input::Tick);
    // Recovers on the node it lands on, from where it was.
    let cmds = h.open("p3");
    assert_eq!(sent(&cmds), vec![r#"{"type":"subscribe","topic":"a","since":{"epoch":"E1","seq":11}}"#]);
    // The next failure starts the backoff from its first step.
    h.now += 60_000;
    h.input(Input::Closed { code: 1006, reason: String::new() });
    let want = h.now + BackoffConfig::default().delay(1, 0.5);
    assert!(
        matches!(h.s.status(), Status::Reconnecting { attempt: 1, retry_at, .. } if *retry_at == want),
        "{:?}",
        h.s.status()
    );
}

#[test]
fn a_node_restarting_over_and_over_is_backed_off_from() {
    let mut h = Harness::default();
    h.open("p1");
    h.now += 60_000;
    h.input(Input::Closed { code: close_code::SERVICE_RESTART, reason: String::new() });
    h.tick_to_deadline();
    h.open("p2");
    // Restarting again at once: the ordinary backoff, escalating.
    h.now += 100;
    let cmds = h.input(Input::Closed { code: close_code::SERVICE_RESTART, reason: String::new() });
    let retry_at = h.now + BackoffConfig::default().delay(1, 0.5);
    let code = Some(close_code::SERVICE_RESTART);
    assert_eq!(statuses(&cmds), vec![Status::Reconnecting { attempt: 1, retry_at, code }]);
    h.at(retry_at, Input::Tick);
    h.open("p3");
    h.now += 100;
    h.input(Input::Closed { code: close_code::SERVICE_RESTART, reason: String::new() });
    assert!(matches!(h.s.status(), Status::Reconnecting { attempt: 2, .. }), "{:?}", h.s.status());
}

#[test]
fn a_refused_handshake_is_probed_and_401_retries_slowly_with_jitter() {
    let mut h = Harness::default();
    h.input(Input::Start);
    let cmds = h.input(Input::Closed { code: 1006, reason: String::new() });
    assert_eq!(cmds, vec![Command::Probe]);
    let cmds = h.input(Input::Probed(Some(401)));
    // Jittered over the upper half of the maximum backoff: 10 s + 0.5 × 10 s.
    let retry_at = h.now + 15_000;
    let reason = Some("the server refused the token (HTTP 401)".to_owned());
    assert_eq!(statuses(&cmds), vec![Status::Unauthorized { retry_at: Some(retry_at), reason }]);
    // Going online or visible does not short-cut an auth wait.
    assert!(h.input(Input::Online).is_empty());
    assert!(h.input(Input::Visibility { hidden: false }).is_empty());
    let cmds = h.at(retry_at, Input::Tick);
    assert_eq!(cmds[0], Command::Connect { token: None });
    // Forbidden the same way.
    let cmds = h.input(Input::Closed { code: 1006, reason: String::new() });
    assert_eq!(cmds, vec![Command::Probe]);
    let cmds = h.input(Input::Probed(Some(403)));
    assert_eq!(statuses(&cmds), vec![Status::Forbidden { retry_at: Some(h.now + 15_000) }]);
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
    assert_eq!(cmds[0], Command::Connect { token: None });
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
    h.input(Input::Publish { topic: t("a"), data: raw("1"), ack: Some(id), echo: false });
    let cmds = h.input(Input::Close);
    assert_eq!(cmds[0], Command::CloseSocket { code: 1000, reason: "closed by the app".into() });
    assert_eq!(acks(&cmds), vec![(id, Err(ClientError::Closed))]);
    assert!(matches!(h.s.status(), Status::Closed { code: Some(1000), .. }));
    assert_eq!(h.s.next_deadline(), None);
    // Publishing after close fails at once instead of queueing forever.
    let id = h.s.next_id();
    let cmds = h.input(Input::Publish { topic: t("a"), data: raw("2"), ack: Some(id), echo: false });
    assert_eq!(acks(&cmds), vec![(id, Err(ClientError::Closed))]);
    assert_eq!(h.s.queued(), 0);
}

#[test]
fn explicit_reconnect_replaces_the_socket_and_resets_backoff() {
    let mut h = Harness::default();
    h.open("p1");
    let cmds = h.input(Input::Reconnect);
    assert_eq!(cmds[0], Command::CloseSocket { code: 1000, reason: "reconnecting".into() });
    assert!(cmds.contains(&Command::Connect { token: None }));
    assert_eq!(h.s.status(), &Status::Connecting { attempt: 0 });
}

#[test]
fn hidden_pages_pause_retries_when_asked_and_online_or_visible_retries_at_once() {
    let mut h = Harness::new(ClientConfig { pause_when_hidden: true, ..ClientConfig::default() });
    h.open("p1");
    h.input(Input::Visibility { hidden: true });
    h.input(Input::Closed { code: 1006, reason: String::new() });
    assert!(matches!(h.s.status(), Status::Reconnecting { .. }));
    assert_eq!(h.s.next_deadline(), None, "paused while hidden");
    h.now += 60_000;
    assert!(h.input(Input::Tick).is_empty());
    let cmds = h.input(Input::Visibility { hidden: false });
    assert_eq!(cmds[0], Command::Connect { token: None });
    // Online short-cuts a scheduled retry as well.
    h.input(Input::Opened);
    h.input(Input::Closed { code: 1006, reason: String::new() });
    assert!(matches!(h.s.status(), Status::Reconnecting { .. }));
    let cmds = h.input(Input::Online);
    assert_eq!(cmds[0], Command::Connect { token: None });
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
fn an_unasked_subscribed_in_a_new_epoch_is_a_reported_reset() {
    // A cluster's broker lost the topic's history while the connection
    // stayed up: the server re-announces the topic at its new position.
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E1", 0, false);
    message(&mut h, "a", 1, "1");
    message(&mut h, "a", 2, "2");
    let cmds = subscribed(&mut h, "a", "E2", 0, false);
    let since = Since { epoch: "E1".into(), seq: 2 };
    assert_eq!(
        events(&cmds),
        vec![
            Event::Error(ClientError::Gap { topic: t("a"), epoch: "E1".into(), after_seq: 2 }),
            Event::Topic { topic: t("a"), status: TopicStatus::Gap { epoch: "E2".into(), missed_after: since } },
        ]
    );
    assert!(sent(&cmds).is_empty(), "nothing to ask again: the history is gone");
    assert_eq!(messages(&message(&mut h, "a", 1, "3")), vec![(1, "3".into())]);
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
    h.input(Input::Publish { topic: t("a"), data: raw("1"), ack: Some(id), echo: false });
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
    h.input(Input::Publish { topic: t("a"), data: raw("1"), ack: Some(id), echo: false });
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
    let mut h = Harness::new(ClientConfig { queue_capacity: 3, ..ClientConfig::default() });
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    let ids: Vec<u64> = (0..4).map(|_| h.s.next_id()).collect();
    let mut cmds = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        cmds.extend(h.input(Input::Publish { topic: t("a"), data: raw(&i.to_string()), ack: Some(*id), echo: false }));
    }
    // The fourth publish evicted the first, and said so.
    let overflow = ClientError::QueueOverflow { topic: t("a") };
    assert_eq!(events(&cmds), vec![Event::Ack { id: ids[0], result: Err(overflow.clone()) }, Event::Error(overflow)]);
    assert_eq!(h.s.queued(), 3);
    // Offline for a while, within the ack timeout.
    let published_at = h.now;
    h.now += 5_000;
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
    // The third times out 15 s after the publish call, offline time included.
    assert!(acks(&h.at(published_at + 14_999, Input::Tick)).is_empty());
    let cmds = h.at(published_at + 15_000, Input::Tick);
    assert_eq!(acks(&cmds), vec![(ack_ids[2], Err(ClientError::AckTimeout(15_000)))]);
}

#[test]
fn acks_in_flight_fail_when_the_connection_drops() {
    let mut h = Harness::default();
    h.open("p1");
    let id = h.s.next_id();
    let cmds = h.input(Input::Publish { topic: t("a"), data: raw("{}"), ack: Some(id), echo: false });
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

// ---- Issue 7: a seq jump is a gap to recover ----

#[test]
fn a_seq_jump_is_recovered_by_resubscribing_from_the_last_contiguous_seq() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E1", 3, false);
    assert_eq!(messages(&message(&mut h, "a", 4, "4")), vec![(4, "4".into())]);
    // Seq 5 never arrived (e.g. lost in a server-side overflow): 6 is not delivered,
    // the position stays at 4, and the client asks the server to replay from there.
    let cmds = message(&mut h, "a", 6, "6");
    assert!(messages(&cmds).is_empty());
    assert_eq!(sent(&cmds), vec![r#"{"type":"subscribe","topic":"a","since":{"epoch":"E1","seq":4}}"#]);
    assert_eq!(h.s.since(&t("a")), Some(Since { epoch: "E1".into(), seq: 4 }));
    // Live messages before the answer are dropped (the replay brings them), and
    // no second resubscribe is sent.
    let cmds = message(&mut h, "a", 7, "7");
    assert!(cmds.is_empty(), "{cmds:?}");
    let cmds = subscribed(&mut h, "a", "E1", 7, true);
    assert_eq!(
        events(&cmds),
        vec![Event::Topic { topic: t("a"), status: TopicStatus::Live { epoch: "E1".into(), recovered: true } }]
    );
    // The replay, then live; anything at or below the position is a duplicate.
    let mut got = Vec::new();
    for seq in [5, 6, 7, 4, 6, 8] {
        got.extend(messages(&message(&mut h, "a", seq, &seq.to_string())));
    }
    assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), [5, 6, 7, 8]);
    assert_eq!(h.s.since(&t("a")), Some(Since { epoch: "E1".into(), seq: 8 }));
}

#[test]
fn a_jump_the_server_cannot_replay_is_reported_as_a_gap() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E1", 10, false);
    message(&mut h, "a", 30, "30");
    let cmds = subscribed(&mut h, "a", "E1", 30, false);
    let since = Since { epoch: "E1".into(), seq: 10 };
    assert_eq!(
        events(&cmds),
        vec![
            Event::Error(ClientError::Gap { topic: t("a"), epoch: "E1".into(), after_seq: 10 }),
            Event::Topic { topic: t("a"), status: TopicStatus::Gap { epoch: "E1".into(), missed_after: since } },
        ]
    );
    assert_eq!(messages(&message(&mut h, "a", 31, "31")), vec![(31, "31".into())]);
}

#[test]
fn a_jump_over_our_own_publishes_is_not_a_gap() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E1", 3, false);
    for seq in [4, 5] {
        let id = h.s.next_id();
        h.input(Input::Publish { topic: t("a"), data: raw("0"), ack: Some(id), echo: false });
        h.frame(&format!(r#"{{"type":"ack","ack":{id},"seq":{seq}}}"#));
    }
    let cmds = message(&mut h, "a", 6, "6");
    assert_eq!(messages(&cmds), vec![(6, "6".into())]);
    assert!(sent(&cmds).is_empty(), "no resubscribe: 4 and 5 were ours");
}

#[test]
fn a_publish_without_ack_to_a_held_topic_is_acknowledged_internally_and_is_not_a_hole() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E1", 3, false);
    let cmds = h.input(Input::Publish { topic: t("a"), data: raw("0"), ack: None, echo: false });
    let [frame] = &sent(&cmds)[..] else { panic!("{cmds:?}") };
    let id: u64 = serde_json::from_str::<serde_json::Value>(frame).unwrap()["ack"].as_u64().expect("an ack id");
    let cmds = h.frame(&format!(r#"{{"type":"ack","ack":{id},"seq":4}}"#));
    assert!(acks(&cmds).is_empty(), "the app asked for no ack: {cmds:?}");
    let cmds = message(&mut h, "a", 5, "5");
    assert_eq!(messages(&cmds), vec![(5, "5".into())]);
    assert!(sent(&cmds).is_empty(), "no resubscribe: 4 was ours");
    // To a topic it does not hold, a publish without ack stays without one.
    let cmds = h.input(Input::Publish { topic: t("elsewhere"), data: raw("0"), ack: None, echo: false });
    assert_eq!(sent(&cmds), vec![r#"{"type":"publish","topic":"elsewhere","data":0}"#]);
}

#[test]
fn a_jump_while_a_plain_subscribe_is_in_flight_waits_for_the_recovery_answer() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E1", 3, false);
    // A presence watcher arrives: a plain re-subscribe goes out.
    h.input(Input::Subscribe { topic: t("a"), presence: true });
    let cmds = message(&mut h, "a", 5, "5");
    assert_eq!(sent(&cmds), vec![r#"{"type":"subscribe","topic":"a","since":{"epoch":"E1","seq":3},"presence":true}"#]);
    // The answer to the plain subscribe names seq 5 but must not move the position past the hole.
    subscribed(&mut h, "a", "E1", 5, false);
    assert_eq!(h.s.since(&t("a")), Some(Since { epoch: "E1".into(), seq: 3 }));
    subscribed(&mut h, "a", "E1", 5, true);
    let got: Vec<u64> = [4, 5].iter().flat_map(|s| messages(&message(&mut h, "a", *s, "0"))).map(|m| m.0).collect();
    assert_eq!(got, [4, 5]);
}

// ---- Tokens that expire ----

/// An unsigned JWT whose payload has `exp` (seconds).
fn jwt(exp: u64, tag: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let json = format!(r#"{{"sub":"u","exp":{exp},"tag":"{tag}"}}"#);
    let mut out = String::new();
    for chunk in json.as_bytes().chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    format!("eyJhbGciOiJIUzI1NiJ9.{out}.sig")
}

fn refresher() -> crate::TokenRefresher {
    // The session only asks for tokens (Command::RefreshToken); tests answer
    // with Input::TokenRefreshed, so this is never called.
    crate::TokenRefresher::new(|| async { Err::<String, _>("not called in session tests") })
}

fn with_refresher(token: Option<String>) -> Harness {
    let mut config =
        ClientConfig { heartbeat_ms: Some(0), token_refresher: Some(refresher()), ..ClientConfig::default() };
    config.token = token;
    Harness::new(config)
}

#[test]
fn an_expired_token_with_a_refresher_reconnects_at_once_and_recovers() {
    let mut h = with_refresher(Some("t0".into()));
    assert_eq!(h.input(Input::Start), vec![Command::Connect { token: Some("t0".into()) }], "a token was given");
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E1", 3, false);
    h.now += 60_000; // up long enough that this is not a crash loop
    let cmds = h.input(Input::Closed { code: 4001, reason: "token expired".into() });
    // At once, with jitter under the minimum backoff (0.5 × 500 ms here).
    let retry_at = h.now + 250;
    assert_eq!(statuses(&cmds), vec![Status::Reconnecting { attempt: 0, retry_at, code: Some(4001) }]);
    let cmds = h.at(retry_at, Input::Tick);
    assert_eq!(cmds[0], Command::RefreshToken, "a new token first");
    let cmds = h.input(Input::TokenRefreshed(Ok("t1".into())));
    assert_eq!(cmds, vec![Command::Connect { token: Some("t1".into()) }]);
    let cmds = h.open("p2");
    assert_eq!(sent(&cmds), vec![r#"{"type":"subscribe","topic":"a","since":{"epoch":"E1","seq":3}}"#]);
    // A token that is refused again at once backs off instead of looping.
    let cmds = h.input(Input::Closed { code: 4001, reason: String::new() });
    assert!(matches!(statuses(&cmds)[..], [Status::Reconnecting { attempt: 1, code: Some(4001), .. }]), "{cmds:?}");
}

#[test]
fn without_a_refresher_4001_is_final_and_waiting_publishes_fail_at_once() {
    let mut h = Harness::default();
    h.open("p1");
    let cmds = h.input(Input::Closed { code: 4001, reason: "token expired".into() });
    let reason = Some("token expired".to_owned());
    assert_eq!(statuses(&cmds), vec![Status::Unauthorized { retry_at: None, reason }]);
    assert_eq!(h.s.next_deadline(), None);
    let id = h.s.next_id();
    let cmds = h.input(Input::Publish { topic: t("a"), data: raw("1"), ack: Some(id), echo: false });
    let ended = ClientError::Ended { code: Some(4001), reason: "token expired".into() };
    assert_eq!(acks(&cmds), vec![(id, Err(ended.clone()))]);
    assert_eq!(h.s.queued(), 0);
    assert!(ended.to_string().contains("reconnect()"), "{ended}");
}

#[test]
fn a_final_close_fails_the_publishes_already_queued() {
    let mut h = Harness::default();
    h.input(Input::Start);
    let id = h.s.next_id();
    h.input(Input::Publish { topic: t("a"), data: raw("1"), ack: Some(id), echo: false });
    h.input(Input::Opened);
    let cmds = h.input(Input::Closed { code: 4003, reason: "banned".into() });
    assert_eq!(acks(&cmds), vec![(id, Err(ClientError::Ended { code: Some(4003), reason: "banned".into() }))]);
    assert_eq!(statuses(&cmds), vec![Status::Forbidden { retry_at: None }]);
}

#[test]
fn the_first_connect_asks_the_refresher_when_no_token_is_given() {
    let mut h = with_refresher(None);
    let cmds = h.input(Input::Start);
    assert_eq!(cmds, vec![Command::RefreshToken]);
    assert_eq!(h.s.status(), &Status::Connecting { attempt: 0 });
    let cmds = h.input(Input::TokenRefreshed(Ok("first".into())));
    assert_eq!(cmds, vec![Command::Connect { token: Some("first".into()) }]);
    assert_eq!(h.s.token(), Some("first"));
}

#[test]
fn a_failing_refresher_is_a_visible_final_status_with_its_error() {
    let mut h = with_refresher(None);
    h.input(Input::Start);
    let id = h.s.next_id();
    h.input(Input::Publish { topic: t("a"), data: raw("1"), ack: Some(id), echo: false });
    let cmds = h.input(Input::TokenRefreshed(Err("login expired".into())));
    let want = Status::Unauthorized { retry_at: None, reason: Some("login expired".into()) };
    assert_eq!(statuses(&cmds), vec![want]);
    assert!(events(&cmds).contains(&Event::Error(ClientError::TokenRefresh("login expired".into()))));
    assert_eq!(acks(&cmds), vec![(id, Err(ClientError::Ended { code: None, reason: "login expired".into() }))]);
    assert_eq!(h.s.next_deadline(), None);
    // The app can try again when it has a way to get a token.
    assert_eq!(h.input(Input::Reconnect)[0], Command::RefreshToken);
}

#[test]
fn a_refresher_that_never_answers_is_retried_with_backoff() {
    let mut h = with_refresher(None);
    h.input(Input::Start);
    assert_eq!(h.s.next_deadline(), Some(h.now + 10_000));
    h.tick_to_deadline();
    assert!(matches!(h.s.status(), Status::Reconnecting { attempt: 1, .. }));
    assert_eq!(h.tick_to_deadline()[0], Command::RefreshToken);
}

#[test]
fn tokens_are_refreshed_in_place_before_they_expire_without_resubscribing() {
    let exp = 1_000 + 3_600; // seconds; the harness starts at 1 000 s
    let mut h = with_refresher(Some(jwt(exp, "a")));
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E1", 3, false);
    // 30 s before expiry the refresher runs.
    assert_eq!(h.s.next_deadline(), Some(exp * 1000 - 30_000));
    let cmds = h.tick_to_deadline();
    assert_eq!(cmds, vec![Command::RefreshToken]);
    assert_eq!(h.s.next_deadline(), None, "one refresh at a time");
    // Messages keep flowing meanwhile.
    assert_eq!(messages(&message(&mut h, "a", 4, "4")).len(), 1);
    let new = jwt(exp + 3_600, "b");
    let cmds = h.input(Input::TokenRefreshed(Ok(new.clone())));
    let id = h.s.next_id - 1;
    assert_eq!(sent(&cmds), vec![format!(r#"{{"type":"refresh","token":"{new}","id":{id}}}"#)]);
    // The server confirms an expiry (its word wins over the token's).
    let confirmed = exp + 1_800;
    assert!(h.frame(&format!(r#"{{"type":"refreshed","id":{id},"exp":{confirmed}}}"#)).is_empty());
    assert_eq!(h.s.next_deadline(), Some(confirmed * 1000 - 30_000));
    assert_eq!(messages(&message(&mut h, "a", 5, "5")).len(), 1, "same connection, same subscription");
    assert!(h.s.status().is_open());
    assert_eq!(h.s.token(), Some(new.as_str()));
}

#[test]
fn a_refused_refresh_is_reported_and_the_expiry_close_reconnects() {
    let exp = 1_000 + 60;
    let mut h = with_refresher(Some(jwt(exp, "a")));
    h.open("p1");
    // A short token: refreshed at half its lifetime, not 30 s before.
    assert_eq!(h.s.next_deadline(), Some(1_000_000 + 30_000));
    h.tick_to_deadline();
    h.input(Input::TokenRefreshed(Ok(jwt(exp + 60, "b"))));
    let id = h.s.next_id - 1;
    let cmds = h.frame(&format!(r#"{{"type":"error","code":"unauthorized","message":"bad token","id":{id}}}"#));
    assert!(
        matches!(&events(&cmds)[..], [Event::Error(ClientError::TokenRefresh(m))] if m.contains("bad token")),
        "{cmds:?}"
    );
    assert_eq!(h.s.next_deadline(), None, "no second try on this connection");
    h.now += 30_000;
    h.input(Input::Closed { code: 4001, reason: "token expired".into() });
    assert_eq!(h.tick_to_deadline()[0], Command::RefreshToken);
}

#[test]
fn a_server_without_auth_ends_in_place_refreshes_for_the_connection() {
    let mut h = with_refresher(Some(jwt(1_000 + 3_600, "a")));
    h.open("p1");
    h.tick_to_deadline();
    h.input(Input::TokenRefreshed(Ok(jwt(1_000 + 7_200, "b"))));
    let id = h.s.next_id - 1;
    h.frame(&format!(r#"{{"type":"refreshed","id":{id}}}"#));
    assert_eq!(h.s.next_deadline(), None, "no expiry, no refresh loop");
}

#[test]
fn an_opaque_token_is_refreshed_in_place_by_the_welcome_expiry_hint() {
    let mut h = with_refresher(Some("opaque".into()));
    h.input(Input::Start);
    h.input(Input::Opened);
    let exp = 1_000 + 600;
    h.frame(&format!(r#"{{"type":"welcome","peer":"p1","heartbeat_ms":0,"version":1,"exp":{exp}}}"#));
    assert_eq!(h.s.next_deadline(), Some(exp * 1000 - 30_000));
    assert_eq!(h.tick_to_deadline(), vec![Command::RefreshToken]);
}

#[test]
fn refresh_in_place_can_be_turned_off() {
    let config = ClientConfig {
        heartbeat_ms: Some(0),
        refresh_in_place: false,
        token: Some(jwt(1_000 + 3_600, "a")),
        token_refresher: Some(refresher()),
        ..ClientConfig::default()
    };
    let mut h = Harness::new(config);
    h.open("p1");
    assert_eq!(h.s.next_deadline(), None, "the 4001 at expiry reconnects instead");
}

#[test]
fn a_refresher_error_in_place_keeps_the_connection_until_expiry() {
    let mut h = with_refresher(Some(jwt(1_000 + 3_600, "a")));
    h.open("p1");
    h.tick_to_deadline();
    let cmds = h.input(Input::TokenRefreshed(Err("offline".into())));
    assert_eq!(events(&cmds), vec![Event::Error(ClientError::TokenRefresh("offline".into()))]);
    assert!(h.s.status().is_open());
}

// ---- Acks and queued publishes always end ----

#[test]
fn ack_deadlines_count_from_the_publish_call_across_offline_time() {
    let mut h = Harness::default();
    h.input(Input::Start);
    let (a, b) = (h.s.next_id(), h.s.next_id());
    h.input(Input::Publish { topic: t("a"), data: raw("1"), ack: Some(a), echo: false });
    h.now += 10_000;
    h.input(Input::Publish { topic: t("a"), data: raw("2"), ack: Some(b), echo: false });
    // Still offline 15 s after the first publish: its future fails, the second waits.
    assert_eq!(h.s.next_deadline(), Some(1_000_000 + 10_000), "the connect timeout comes first");
    let cmds = h.at(1_000_000 + 15_000, Input::Tick);
    assert_eq!(acks(&cmds), vec![(a, Err(ClientError::AckTimeout(15_000)))]);
    assert_eq!(h.s.queued(), 1);
    // The second is sent after connecting and keeps its original deadline.
    h.tick_to_deadline(); // the retry
    let cmds = h.open("p1");
    assert_eq!(sent(&cmds), vec![format!(r#"{{"type":"publish","topic":"a","data":2,"ack":{b}}}"#)]);
    let cmds = h.at(1_000_000 + 25_000, Input::Tick);
    assert_eq!(acks(&cmds), vec![(b, Err(ClientError::AckTimeout(15_000)))]);
}

#[test]
fn the_offline_event_makes_the_connection_suspect() {
    let mut h = Harness::default();
    h.open("p1");
    let cmds = h.input(Input::Offline);
    assert_eq!(sent(&cmds), vec![r#"{"type":"ping","id":1}"#]);
    assert_eq!(h.s.next_deadline(), Some(h.now + 3_000), "not the 25 s heartbeat");
    assert!(sent(&h.input(Input::Offline)).is_empty(), "one check at a time");
    let cmds = h.tick_to_deadline();
    assert_eq!(cmds[0], Command::CloseSocket { code: 3008, reason: "no pong from the server".into() });
    assert!(matches!(h.s.status(), Status::Reconnecting { code: Some(3008), .. }));
    // Online again: connect at once.
    assert!(matches!(h.input(Input::Online)[0], Command::Connect { .. }));
}

#[test]
fn a_pong_clears_the_suspicion_and_online_checks_an_open_connection() {
    let mut h = Harness::default();
    h.open("p1");
    let start = h.now;
    h.input(Input::Offline);
    h.now += 500;
    h.frame(r#"{"type":"pong","id":1}"#);
    assert_eq!(h.s.next_deadline(), Some(start + 25_000), "back to the heartbeat");
    let cmds = h.input(Input::Online);
    assert_eq!(sent(&cmds), vec![r#"{"type":"ping","id":2}"#]);
}

#[test]
fn a_hidden_tab_keeps_reconnecting_by_default() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Visibility { hidden: true });
    h.input(Input::Closed { code: 1006, reason: String::new() });
    let Status::Reconnecting { retry_at, .. } = *h.s.status() else { panic!() };
    assert_eq!(h.s.next_deadline(), Some(retry_at));
    assert!(matches!(h.tick_to_deadline()[0], Command::Connect { .. }));
}

// ---- Protocol version, presence interest, local echo, history ----

#[test]
fn a_server_speaking_another_protocol_version_ends_in_closed() {
    let mut h = Harness::default();
    let id = h.s.next_id();
    h.input(Input::Publish { topic: t("a"), data: raw("1"), ack: Some(id), echo: false });
    h.input(Input::Start);
    h.input(Input::Opened);
    let cmds = h.frame(r#"{"type":"welcome","peer":"p1","heartbeat_ms":25000,"version":2}"#);
    assert_eq!(cmds[0], Command::CloseSocket { code: 1000, reason: "unsupported protocol".into() });
    let reason = "the server speaks protocol version 2; this client speaks 1".to_owned();
    assert_eq!(statuses(&cmds), vec![Status::Closed { code: None, reason: reason.clone() }]);
    assert_eq!(acks(&cmds), vec![(id, Err(ClientError::Ended { code: None, reason }))]);
    assert_eq!(h.s.next_deadline(), None, "no endless retries");
    assert!(sent(&cmds).is_empty());
}

#[test]
fn dropping_the_last_presence_watcher_tells_the_server() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    h.input(Input::Subscribe { topic: t("a"), presence: true });
    h.input(Input::Subscribe { topic: t("a"), presence: true });
    subscribed(&mut h, "a", "E", 0, false);
    subscribed(&mut h, "a", "E", 0, false);
    h.frame(r#"{"type":"presence","topic":"a","id":1,"peers":[{"peer":"p1"}]}"#);
    assert!(sent(&h.input(Input::Unsubscribe { topic: t("a"), presence: true })).is_empty(), "one watcher left");
    let cmds = h.input(Input::Unsubscribe { topic: t("a"), presence: true });
    assert_eq!(sent(&cmds), vec![r#"{"type":"subscribe","topic":"a"}"#], "re-subscribed without presence");
    assert_eq!(h.s.presence(&t("a")), None);
    // Events already on their way are ignored; the topic stays live.
    assert!(h.frame(r#"{"type":"join","topic":"a","peer":"p7"}"#).is_empty());
    let cmds = subscribed(&mut h, "a", "E", 0, false);
    assert!(sent(&cmds).is_empty(), "no presence request");
    assert!(h.s.topic_status(&t("a")).unwrap().is_live());
}

#[test]
fn local_echo_delivers_own_publishes_with_their_seq_once_acked() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("a"), presence: false });
    subscribed(&mut h, "a", "E", 0, false);
    let id = h.s.next_id();
    let cmds = h.input(Input::Publish { topic: t("a"), data: raw(r#"{"x":1}"#), ack: Some(id), echo: true });
    assert!(messages(&cmds).is_empty(), "not before the server assigned a seq");
    let cmds = h.frame(&format!(r#"{{"type":"ack","ack":{id},"seq":1}}"#));
    let [Event::Ack { .. }, Event::Message(m)] = &events(&cmds)[..] else { panic!("{cmds:?}") };
    assert_eq!((m.seq, m.from.as_str(), m.data.get(), m.local), (1, "p1", r#"{"x":1}"#, true));
    // A publish without echo is not delivered locally.
    let id = h.s.next_id();
    h.input(Input::Publish { topic: t("a"), data: raw("2"), ack: Some(id), echo: false });
    assert!(messages(&h.frame(&format!(r#"{{"type":"ack","ack":{id},"seq":2}}"#))).is_empty());
}

fn histories(cmds: &[Command]) -> Vec<(u64, Result<History, ClientError>)> {
    events(cmds)
        .into_iter()
        .filter_map(|e| match e {
            Event::History { id, result } => Some((id, result)),
            _ => None,
        })
        .collect()
}

#[test]
fn history_requests_wait_for_the_connection_and_are_answered() {
    let mut h = Harness::default();
    h.input(Input::Start);
    let id = h.s.next_id();
    let since = Some(Since { epoch: "E".into(), seq: 2 });
    assert!(sent(&h.input(Input::History { id, topic: t("a"), since, limit: Some(2) })).is_empty());
    let cmds = h.open("p1");
    let ask = format!(r#"{{"type":"history","topic":"a","since":{{"epoch":"E","seq":2}},"limit":2,"id":{id}}}"#);
    assert_eq!(sent(&cmds), vec![ask.clone()]);
    // Lost with the connection: asked again on the next one.
    h.input(Input::Closed { code: 1006, reason: String::new() });
    h.tick_to_deadline();
    assert_eq!(sent(&h.open("p2")), vec![ask]);
    let cmds = h.frame(&format!(
        r#"{{"type":"history","topic":"a","id":{id},"epoch":"E","seq":9,"messages":[{{"seq":3,"from":"p9","data":"x"}}]}}"#
    ));
    let [(got, Ok(page))] = &histories(&cmds)[..] else { panic!("{cmds:?}") };
    assert_eq!((*got, page.epoch.as_str(), page.seq, page.messages.len()), (id, "E", 9, 1));
    assert_eq!((page.messages[0].seq, page.messages[0].data.get()), (3, r#""x""#));
}

/// A large history comes in pages: each `next` is asked for, with what is
/// still missing, until the limit is reached or the server has no more; the
/// app gets one answer, every page in order. Each page renews the deadline.
#[test]
fn history_pages_are_followed_until_the_limit_or_the_end() {
    let mut h = Harness::default();
    h.open("p1");
    let id = h.s.next_id();
    let cmds = h.input(Input::History { id, topic: t("a"), since: None, limit: Some(5) });
    assert_eq!(sent(&cmds), vec![format!(r#"{{"type":"history","topic":"a","limit":5,"id":{id}}}"#)]);
    let page = |seqs: &[u64], next: Option<u64>| {
        let messages: Vec<String> = seqs.iter().map(|s| format!(r#"{{"seq":{s},"from":"p9","data":{s}}}"#)).collect();
        let next = next.map(|n| format!(r#","next":{n}"#)).unwrap_or_default();
        format!(
            r#"{{"type":"history","topic":"a","id":{id},"epoch":"E","seq":9,"messages":[{}]{next}}}"#,
            messages.join(",")
        )
    };
    // 10 s into a 15 s timeout: the next page gets 15 s of its own.
    let cmds = h.at(h.now + 10_000, Input::Frame(page(&[5, 6], Some(6))));
    assert!(histories(&cmds).is_empty(), "not all of it yet");
    let ask = format!(r#"{{"type":"history","topic":"a","since":{{"epoch":"E","seq":6}},"limit":3,"id":{id}}}"#);
    assert_eq!(sent(&cmds), vec![ask]);
    assert!(histories(&h.at(h.now + 10_000, Input::Tick)).is_empty(), "the deadline moved");
    let cmds = h.frame(&page(&[7], Some(7)));
    assert!(sent(&cmds)[0].contains(r#""seq":7},"limit":2"#), "{cmds:?}");
    let cmds = h.frame(&page(&[8, 9], None));
    let [(got, Ok(all))] = &histories(&cmds)[..] else { panic!("{cmds:?}") };
    assert_eq!(*got, id);
    assert_eq!(all.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [5, 6, 7, 8, 9]);
    assert!(sent(&cmds).is_empty());

    // With its limit reached, a `next` is not followed.
    let id = h.s.next_id();
    h.input(Input::History { id, topic: t("a"), since: None, limit: Some(1) });
    let cmds = h.frame(&format!(
        r#"{{"type":"history","topic":"a","id":{id},"epoch":"E","seq":9,"messages":[{{"seq":9,"from":"p","data":1}}],"next":9}}"#
    ));
    assert_eq!(histories(&cmds).len(), 1);
    assert!(sent(&cmds).is_empty());
}

#[test]
fn history_errors_timeouts_and_final_closes_end_the_request() {
    let mut h = Harness::default();
    h.open("p1");
    let (a, b) = (h.s.next_id(), h.s.next_id());
    h.input(Input::History { id: a, topic: t("a"), since: None, limit: None });
    let cmds =
        h.frame(&format!(r#"{{"type":"error","code":"history_unavailable","message":"gone","topic":"a","id":{a}}}"#));
    let [(_, Err(ClientError::Server { code: ErrorCode::HistoryUnavailable, .. }))] = &histories(&cmds)[..] else {
        panic!("{cmds:?}")
    };
    h.input(Input::History { id: b, topic: t("a"), since: None, limit: None });
    let cmds = h.at(h.now + 15_000, Input::Tick);
    assert_eq!(histories(&cmds), vec![(b, Err(ClientError::RequestTimeout(15_000)))]);
    h.input(Input::Close);
    let c = h.s.next_id();
    let cmds = h.input(Input::History { id: c, topic: t("a"), since: None, limit: None });
    assert_eq!(histories(&cmds), vec![(c, Err(ClientError::Closed))]);
}

#[test]
fn a_refreshed_token_that_revokes_a_topic_marks_it_refused() {
    let mut h = Harness::default();
    h.open("p1");
    h.input(Input::Subscribe { topic: t("admin"), presence: false });
    subscribed(&mut h, "admin", "E", 0, false);
    let cmds = h.frame(r#"{"type":"error","code":"forbidden","message":"revoked","topic":"admin"}"#);
    assert!(matches!(h.s.topic_status(&t("admin")), Some(TopicStatus::Refused(_))), "{cmds:?}");
}
