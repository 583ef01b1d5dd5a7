//! Which LSN the source may confirm to PostgreSQL (DESIGN.md rule 1).
//!
//! Transactions are tracked in stream order. A transaction is done when its Commit arrived and
//! Kafka acknowledged every event it produced. The confirmable LSN is the end LSN of the last
//! transaction such that it and every transaction before it are done. A keepalive or heartbeat
//! position is taken only when nothing is open or unacknowledged, so a confirmed LSN never passes
//! an event Kafka has not acknowledged, and an idle stream still moves forward.

use std::collections::VecDeque;

use scoresync_event::Lsn;

/// A transaction's handle in [`Progress`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TxId(u64);

#[derive(Debug)]
struct TxState {
    id: u64,
    pending: usize,
    end_lsn: Option<Lsn>,
}

/// Per-transaction acknowledgement tracking.
#[derive(Debug)]
pub struct Progress {
    txs: VecDeque<TxState>,
    next_id: u64,
    confirmable: Lsn,
    in_flight: usize,
}

impl Progress {
    /// Starts from `confirmed`, the position PostgreSQL already has.
    pub fn new(confirmed: Lsn) -> Self {
        Progress { txs: VecDeque::new(), next_id: 0, confirmable: confirmed, in_flight: 0 }
    }

    /// A transaction began.
    pub fn begin(&mut self) -> TxId {
        let id = self.next_id;
        self.next_id += 1;
        self.txs.push_back(TxState { id, pending: 0, end_lsn: None });
        TxId(id)
    }

    /// An event of `tx` went to Kafka.
    pub fn sent(&mut self, tx: TxId) {
        if let Some(state) = self.state(tx) {
            state.pending += 1;
            self.in_flight += 1;
        }
    }

    /// Kafka acknowledged an event of `tx`.
    pub fn acked(&mut self, tx: TxId) {
        if let Some(state) = self.state(tx) {
            state.pending = state.pending.saturating_sub(1);
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        self.advance();
    }

    /// The Commit of `tx` arrived; `end_lsn` is where the next transaction starts.
    pub fn commit(&mut self, tx: TxId, end_lsn: Lsn) {
        if let Some(state) = self.state(tx) {
            state.end_lsn = Some(end_lsn);
        }
        self.advance();
    }

    /// A keepalive or heartbeat reported the server at `lsn`. Taken only when no transaction is
    /// open and nothing is unacknowledged.
    pub fn idle_at(&mut self, lsn: Lsn) {
        if self.txs.is_empty() && lsn > self.confirmable {
            self.confirmable = lsn;
        }
    }

    /// The LSN that may be confirmed: everything before it is in Kafka.
    pub fn confirmable(&self) -> Lsn {
        self.confirmable
    }

    /// Events sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// True when no transaction is open and nothing is unacknowledged.
    pub fn is_idle(&self) -> bool {
        self.txs.is_empty()
    }

    fn state(&mut self, tx: TxId) -> Option<&mut TxState> {
        let front = self.txs.front()?.id;
        let index = usize::try_from(tx.0.checked_sub(front)?).ok()?;
        self.txs.get_mut(index)
    }

    fn advance(&mut self) {
        while let Some(front) = self.txs.front() {
            match front.end_lsn {
                Some(end) if front.pending == 0 => {
                    self.confirmable = self.confirmable.max(end);
                    self.txs.pop_front();
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::*;

    #[test]
    fn confirms_only_fully_acknowledged_committed_prefix() {
        let mut p = Progress::new(Lsn(10));
        let a = p.begin();
        p.sent(a);
        p.sent(a);
        p.commit(a, Lsn(20));
        let b = p.begin();
        p.sent(b);
        p.commit(b, Lsn(30));
        // b acknowledged first: a still holds the line.
        p.acked(b);
        assert_eq!(p.confirmable(), Lsn(10));
        p.acked(a);
        assert_eq!(p.confirmable(), Lsn(10));
        p.acked(a);
        assert_eq!(p.confirmable(), Lsn(30));
        assert!(p.is_idle());
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn open_transaction_blocks_even_when_acknowledged() {
        let mut p = Progress::new(Lsn(0));
        let a = p.begin();
        p.sent(a);
        p.acked(a);
        assert_eq!(p.confirmable(), Lsn(0), "no commit yet");
        p.idle_at(Lsn(99));
        assert_eq!(p.confirmable(), Lsn(0), "keepalive must not pass an open transaction");
        p.commit(a, Lsn(50));
        assert_eq!(p.confirmable(), Lsn(50));
    }

    #[test]
    fn keepalive_advances_only_when_idle_and_never_backwards() {
        let mut p = Progress::new(Lsn(100));
        p.idle_at(Lsn(90));
        assert_eq!(p.confirmable(), Lsn(100));
        p.idle_at(Lsn(120));
        assert_eq!(p.confirmable(), Lsn(120));
        let a = p.begin();
        p.sent(a);
        p.commit(a, Lsn(130));
        p.idle_at(Lsn(200));
        assert_eq!(p.confirmable(), Lsn(120), "unacknowledged event blocks keepalives");
        p.acked(a);
        assert_eq!(p.confirmable(), Lsn(130));
    }

    #[test]
    fn empty_transaction_is_done_at_commit() {
        let mut p = Progress::new(Lsn(0));
        let a = p.begin();
        p.commit(a, Lsn(7));
        assert_eq!(p.confirmable(), Lsn(7));
    }

    #[test]
    fn random_acknowledgement_orders_never_pass_an_unacknowledged_event() {
        // Many interleavings of acks across 50 transactions, the same on every run (seeded).
        let mut rng = StdRng::seed_from_u64(0x9E37_79B9_7F4A_7C15);
        for _round in 0..200 {
            let mut p = Progress::new(Lsn(0));
            let mut outstanding: Vec<(TxId, u64)> = Vec::new();
            for i in 0..50_u64 {
                let tx = p.begin();
                for _ in 0..rng.random_range(0..4) {
                    p.sent(tx);
                    outstanding.push((tx, i));
                }
                p.commit(tx, Lsn((i + 1) * 10));
            }
            while !outstanding.is_empty() {
                let pick = rng.random_range(0..outstanding.len());
                let (tx, _) = outstanding.swap_remove(pick);
                p.acked(tx);
                let oldest_pending = outstanding.iter().map(|(_, i)| *i).min();
                if let Some(i) = oldest_pending {
                    // The transaction `i` ends at (i+1)*10: confirmable must be below it.
                    assert!(p.confirmable() < Lsn((i + 1) * 10), "passed pending tx {i}");
                }
            }
            assert_eq!(p.confirmable(), Lsn(500));
        }
    }
}
