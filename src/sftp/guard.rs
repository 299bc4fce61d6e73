//! Pre-authentication defences: how many connections may be unauthenticated at once (overall and
//! per address), which addresses are banned for a growing time after repeated failures (like
//! OpenSSH's PerSourcePenalties), and how many sessions one user may hold.
//!
//! Pure bookkeeping behind a mutex, with time passed in, so it is unit-tested without sockets. It
//! never looks at keys or users' files; `server` asks it before and after authentication.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The limits. See `config::Limits` for defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_ip: usize,
    pub auth_timeout: Duration,
    /// Connections that end without logging in before an address is banned.
    pub penalty_after: u32,
    /// The first ban; each further failure doubles it…
    pub penalty_base: Duration,
    /// …up to this.
    pub penalty_max: Duration,
    pub max_sessions_per_user: usize,
    /// Interrupted uploads one user may keep at once (after the login: checked when a new upload
    /// opens, see `sftp::fs`).
    pub max_partials_per_user: usize,
    /// Addresses never banned (a load balancer's health checks, a monitoring host).
    pub penalty_exempt: Vec<ipnet::IpNet>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_unauthenticated: 64,
            max_unauthenticated_per_ip: 8,
            auth_timeout: Duration::from_secs(30),
            penalty_after: 5,
            penalty_base: Duration::from_secs(30),
            penalty_max: Duration::from_secs(3600),
            max_sessions_per_user: 16,
            max_partials_per_user: 100,
            penalty_exempt: Vec::new(),
        }
    }
}

/// Why a connection is refused before SSH starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Banned { remaining: Duration },
    TooManyUnauthenticated,
    TooManyFromAddress,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Banned { remaining } => write!(
                f,
                "the address is banned for {}s after repeated failed logins",
                remaining.as_secs().max(1)
            ),
            Refusal::TooManyUnauthenticated => {
                write!(f, "too many connections are waiting to log in")
            }
            Refusal::TooManyFromAddress => {
                write!(
                    f,
                    "too many connections from this address are waiting to log in"
                )
            }
        }
    }
}

#[derive(Debug, Default)]
struct Source {
    unauthenticated: usize,
    failures: u32,
    banned_until: Option<Instant>,
    /// Silent connections forgiven lately, and since when that count runs (see [`SILENT_FREE`]).
    silent: u32,
    silent_since: Option<Instant>,
}

/// Silent connections an address may have forgiven in a burst; one more is forgiven every
/// [`SILENT_REFILL`]. A health check every few seconds stays within it; a peer that keeps opening
/// silent connections to hold places does not, and is counted (and banned) like any failure.
const SILENT_FREE: u32 = 10;
const SILENT_REFILL: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
struct Inner {
    unauthenticated: usize,
    sources: HashMap<IpAddr, Source>,
    sessions: HashMap<String, usize>,
}

/// Keeps the counts; shared by every connection.
#[derive(Debug)]
pub struct Guard {
    limits: Limits,
    inner: Mutex<Inner>,
}

/// Addresses tracked before old, harmless entries are forgotten.
const MAX_SOURCES: usize = 100_000;

impl Guard {
    pub fn new(limits: Limits) -> Arc<Guard> {
        Arc::new(Guard {
            limits,
            inner: Mutex::new(Inner::default()),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How many addresses are banned at `now`.
    pub fn bans_in_force(&self, now: Instant) -> usize {
        self.lock()
            .sources
            .values()
            .filter(|source| source.banned_until.is_some_and(|until| until > now))
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(inner) => inner,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Admits a new connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Ticket, Refusal> {
        let mut inner = self.lock();
        if inner.sources.len() > MAX_SOURCES {
            inner.sources.retain(|_, source| {
                source.unauthenticated > 0 || source.banned_until.is_some_and(|until| until > now)
            });
        }
        let source = inner.sources.entry(ip).or_default();
        if let Some(until) = source.banned_until
            && until > now
        {
            return Err(Refusal::Banned {
                remaining: until - now,
            });
        }
        if source.unauthenticated >= self.limits.max_unauthenticated_per_ip {
            return Err(Refusal::TooManyFromAddress);
        }
        source.unauthenticated += 1;
        if inner.unauthenticated >= self.limits.max_unauthenticated {
            if let Some(source) = inner.sources.get_mut(&ip) {
                source.unauthenticated -= 1;
            }
            return Err(Refusal::TooManyUnauthenticated);
        }
        inner.unauthenticated += 1;
        Ok(Ticket {
            guard: self.clone(),
            ip,
            state: TicketState::Waiting,
            spoke: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            admitted: now,
        })
    }

    /// Takes a session slot for `username`; `false` when the user has too many.
    pub fn open_session(&self, username: &str) -> bool {
        let mut inner = self.lock();
        let count = inner.sessions.entry(username.to_string()).or_default();
        if *count >= self.limits.max_sessions_per_user {
            return false;
        }
        *count += 1;
        true
    }

    fn close_session(&self, username: &str) {
        let mut inner = self.lock();
        if let Some(count) = inner.sessions.get_mut(username) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                inner.sessions.remove(username);
            }
        }
    }

    fn leave_unauthenticated(inner: &mut Inner, ip: IpAddr) {
        inner.unauthenticated = inner.unauthenticated.saturating_sub(1);
        if let Some(source) = inner.sources.get_mut(&ip) {
            source.unauthenticated = source.unauthenticated.saturating_sub(1);
        }
    }

    /// A connection from `ip` closed quickly without sending anything: forgiven while the address
    /// has silent connections to spare, a failure after that.
    fn silent_close(&self, ip: IpAddr, now: Instant) {
        {
            let mut inner = self.lock();
            let source = inner.sources.entry(ip).or_default();
            let since = *source.silent_since.get_or_insert(now);
            let refilled =
                now.saturating_duration_since(since).as_millis() / SILENT_REFILL.as_millis().max(1);
            if refilled > 0 {
                source.silent = source
                    .silent
                    .saturating_sub(u32::try_from(refilled).unwrap_or(u32::MAX));
                source.silent_since = Some(now);
            }
            if source.silent < SILENT_FREE {
                source.silent += 1;
                Guard::leave_unauthenticated(&mut inner, ip);
                return;
            }
        }
        self.penalise(ip, now);
    }

    /// A connection from `ip` ended without logging in: count it, and ban when there are too many.
    fn penalise(&self, ip: IpAddr, now: Instant) {
        let mut inner = self.lock();
        Guard::leave_unauthenticated(&mut inner, ip);
        let limits = &self.limits;
        if limits.penalty_exempt.iter().any(|net| net.contains(&ip)) {
            return;
        }
        let source = inner.sources.entry(ip).or_default();
        source.failures = source.failures.saturating_add(1);
        if source.failures >= limits.penalty_after {
            let doublings = (source.failures - limits.penalty_after).min(16);
            let ban = limits
                .penalty_base
                .saturating_mul(2u32.saturating_pow(doublings))
                .min(limits.penalty_max);
            source.banned_until = Some(now + ban);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TicketState {
    Waiting,
    LoggedIn(String),
    Done,
}

/// How long a connection may stay silent and still not count as a failure when it closes: a TCP
/// health check or port probe closes at once, while a peer holding a place open does not.
pub const SILENT_GRACE: Duration = Duration::from_secs(5);

/// One admitted connection. Dropping it without logging in counts as a failure for its address,
/// unless the peer never sent a byte and left within [`SILENT_GRACE`] (it tried nothing).
#[derive(Debug)]
pub struct Ticket {
    guard: Arc<Guard>,
    ip: IpAddr,
    state: TicketState,
    spoke: Arc<std::sync::atomic::AtomicBool>,
    admitted: Instant,
}

impl Ticket {
    /// Set by the socket once the peer has sent something.
    pub fn spoke(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.spoke.clone()
    }

    /// The connection logged in as `username` (whose session slot is already taken): it no longer
    /// counts as unauthenticated, and its address's failures are forgiven.
    pub fn logged_in(&mut self, username: &str) {
        match self.state {
            TicketState::LoggedIn(_) => return,
            TicketState::Waiting => {
                let mut inner = self.guard.lock();
                Guard::leave_unauthenticated(&mut inner, self.ip);
                if let Some(source) = inner.sources.get_mut(&self.ip) {
                    source.failures = 0;
                }
            }
            // Forgiven earlier (refused for too many sessions), then a later attempt succeeded: it
            // no longer counts as waiting, but its session slot must still be given back at the end.
            TicketState::Done => {}
        }
        self.state = TicketState::LoggedIn(username.to_string());
    }

    /// Ends the wait without logging in and without a penalty (refused for a reason that is not the
    /// address's fault, such as too many sessions for the user).
    pub fn forgive(&mut self) {
        if self.state == TicketState::Waiting {
            let mut inner = self.guard.lock();
            Guard::leave_unauthenticated(&mut inner, self.ip);
            self.state = TicketState::Done;
        }
    }

    pub fn is_logged_in(&self) -> bool {
        matches!(self.state, TicketState::LoggedIn(_))
    }

    /// Ends the connection at `now`.
    pub fn finish(&mut self, now: Instant) {
        match std::mem::replace(&mut self.state, TicketState::Done) {
            TicketState::Waiting
                if self.spoke.load(std::sync::atomic::Ordering::SeqCst)
                    || now.saturating_duration_since(self.admitted) >= SILENT_GRACE =>
            {
                self.guard.penalise(self.ip, now);
            }
            TicketState::Waiting => self.guard.silent_close(self.ip, now),
            TicketState::LoggedIn(username) => self.guard.close_session(&username),
            TicketState::Done => {}
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.finish(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_unauthenticated: 3,
            max_unauthenticated_per_ip: 2,
            penalty_after: 2,
            penalty_base: Duration::from_secs(10),
            penalty_max: Duration::from_secs(25),
            max_sessions_per_user: 1,
            ..Limits::default()
        }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));
    const C: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 4));

    #[test]
    fn caps_unauthenticated_connections_overall_and_per_address() {
        let guard = Guard::new(limits());
        let now = Instant::now();
        let a1 = guard.admit(A, now).unwrap();
        let _a2 = guard.admit(A, now).unwrap();
        assert_eq!(
            guard.admit(A, now).unwrap_err(),
            Refusal::TooManyFromAddress
        );
        let mut b1 = guard.admit(B, now).unwrap();
        assert_eq!(
            guard.admit(C, now).unwrap_err(),
            Refusal::TooManyUnauthenticated
        );
        assert!(guard.open_session("acme"));
        b1.logged_in("acme");
        assert!(
            guard.admit(C, now).is_ok(),
            "a logged-in connection frees its place"
        );
        drop(a1);
    }

    /// A connection from `ip` that sent something and ended without logging in.
    fn fail(guard: &Arc<Guard>, ip: IpAddr, now: Instant) {
        let mut ticket = guard.admit(ip, now).unwrap();
        ticket
            .spoke()
            .store(true, std::sync::atomic::Ordering::SeqCst);
        ticket.finish(now);
    }

    #[test]
    fn silent_connections_and_exempt_networks_are_never_banned() {
        let mut exempt = limits();
        exempt.penalty_exempt = vec!["10.0.0.0/8".parse().unwrap()];
        let guard = Guard::new(exempt);
        let now = Instant::now();
        for check in 0..100 {
            // A TCP health check every 5 s: connect, close, never a byte.
            let at = now + Duration::from_secs(5 * check);
            guard.admit(A, at).unwrap().finish(at);
            fail(&guard, "10.1.2.3".parse().unwrap(), at);
        }
        let now = now + Duration::from_secs(500);
        assert!(guard.admit(A, now).is_ok());
        assert!(guard.admit("10.1.2.3".parse().unwrap(), now).is_ok());
        fail(&guard, A, now);
        fail(&guard, A, now);
        assert!(
            guard.admit(A, now).is_err(),
            "speaking and failing still counts"
        );
    }

    #[test]
    fn a_burst_of_silent_connections_is_banned_like_failures() {
        let guard = Guard::new(limits());
        let now = Instant::now();
        for _ in 0..SILENT_FREE {
            guard.admit(B, now).unwrap().finish(now);
        }
        // limits() bans after two failures: the next two silent connections are failures.
        guard.admit(B, now).unwrap().finish(now);
        guard.admit(B, now).unwrap().finish(now);
        assert!(
            guard.admit(B, now).is_err(),
            "beyond the burst, silent connections count"
        );
    }

    #[test]
    fn repeated_failures_ban_for_a_growing_time_and_a_login_forgives() {
        let guard = Guard::new(limits());
        let start = Instant::now();
        fail(&guard, A, start);
        fail(&guard, A, start);
        // Two failures: banned for 10 s.
        assert_eq!(
            guard.admit(A, start).unwrap_err(),
            Refusal::Banned {
                remaining: Duration::from_secs(10)
            }
        );
        assert!(
            guard.admit(B, start).is_ok(),
            "other addresses are unaffected"
        );
        let later = start + Duration::from_secs(11);
        fail(&guard, A, later);
        // Third failure: 20 s; fourth would be 40 s but is capped at 25 s.
        assert_eq!(
            guard.admit(A, later).unwrap_err(),
            Refusal::Banned {
                remaining: Duration::from_secs(20)
            }
        );
        let much_later = later + Duration::from_secs(21);
        fail(&guard, A, much_later);
        assert_eq!(
            guard.admit(A, much_later).unwrap_err(),
            Refusal::Banned {
                remaining: Duration::from_secs(25)
            }
        );
        let after = much_later + Duration::from_secs(26);
        let mut ticket = guard.admit(A, after).unwrap();
        assert!(guard.open_session("acme"));
        ticket.logged_in("acme");
        ticket.finish(after);
        fail(&guard, A, after);
        assert!(
            guard.admit(A, after).is_ok(),
            "failures were forgiven by the login"
        );
    }

    #[test]
    fn a_login_after_a_forgiven_refusal_still_returns_its_session_slot() {
        let guard = Guard::new(limits());
        let now = Instant::now();
        let mut ticket = guard.admit(A, now).unwrap();
        ticket.forgive();
        assert!(guard.open_session("acme"));
        ticket.logged_in("acme");
        assert!(!guard.open_session("acme"));
        drop(ticket);
        assert!(guard.open_session("acme"), "the slot was given back");
    }

    #[test]
    fn sessions_per_user() {
        let guard = Guard::new(limits());
        let now = Instant::now();
        let mut ticket = guard.admit(A, now).unwrap();
        assert!(guard.open_session("acme"));
        ticket.logged_in("acme");
        assert!(!guard.open_session("acme"));
        assert!(guard.open_session("other"));
        drop(ticket);
        assert!(guard.open_session("acme"));
    }
}
