//! The plan for one scorecard change: which rows it writes where, decided with no I/O.
//!
//! The executor ([`crate::apply`]) gathers the inputs (the card's previous state from the cache
//! or the shards, where its new fields route now, whether every earlier row is acknowledged),
//! asks [`plan_card`], and then only looks up and adds the rows the plan names. Every rule about
//! moves, replays and staleness lives here, as a table of unit tests.
//!
//! Invariants the plans keep:
//! - A change older than what is stored (by `(version, seq)`) never writes to another shard than
//!   the card's current one, so a replay cannot leave a stale live copy behind ([`CardPlan::Stale`]).
//! - A card whose routing changed moves with its children: a delete marker on the old shard, the
//!   card and its children on the new one, all at the change's version ([`CardPlan::Move`]). Also
//!   a card deleted and inserted again with other routing: its children stayed where it was.
//! - A change of the fields children carry rewrites them in place ([`CardPlan::Refresh`]).
//! - The very change the shards hold as the card's newest, read again after a crash or a
//!   rebalance, looks for live leftovers of a move it may have made on every other shard
//!   ([`CardPlan::Replay`], [`CardPlan::FinishMove`]): each shard and table is a separate insert,
//!   so a crash can cut a move short.
//! - Anything that reads back stored rows (a move, a refresh, a replay) waits until every earlier
//!   row is acknowledged ([`Wait::Flush`]), so it never reads a state older than the one it follows.

use crate::cache::CardState;
use crate::park::ParkReason;
use crate::route::{CardFields, Conversation};
use crate::shard::ShardIndex;

/// A change's place in the history of its row: commit version, then position in the transaction.
pub(crate) type Stamp = (u64, u32);

/// Where a scorecard's fields route now, as the executor found out.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Placement {
    /// The shard, with the conversation for conversation scorecards.
    Routed {
        /// The shard.
        shard: ShardIndex,
        /// Its conversation (conversation scorecards).
        conversation: Option<Conversation>,
    },
    /// Not yet routable (its conversation is on no shard yet): the change parks.
    NotYet(ParkReason),
    /// Never routable (a process scorecard without a time, ...): the change is poison.
    Never(String),
}

/// One change of a scorecard, as the plan needs it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CardChange {
    /// Its stamp.
    pub stamp: Stamp,
    /// True for a delete (`fields` are then the old row's).
    pub delete: bool,
    /// The card's routing and denormalized fields after the change.
    pub fields: CardFields,
}

/// What a card change writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CardPlan {
    /// Nothing: a stale delete, or a delete of a card stored nowhere and not routable.
    Nothing,
    /// Older than the stored state: written again on `rewrite_on` (where the card lives, so it
    /// loses to the stored row) or nowhere.
    Stale {
        /// The card's shard, when the change routes there too.
        rewrite_on: Option<ShardIndex>,
    },
    /// A delete marker for the card on `shard` (its children keep routing there).
    Delete {
        /// The card's shard.
        shard: ShardIndex,
    },
    /// The card on `shard`; its children stay as they are.
    Write {
        /// The card's shard.
        shard: ShardIndex,
    },
    /// The card and its children move: delete markers on `from`, copies on `to`.
    Move {
        /// The old shard.
        from: ShardIndex,
        /// The new shard.
        to: ShardIndex,
    },
    /// The card on `shard`, and its children rewritten there with its new fields.
    Refresh {
        /// The card's shard.
        shard: ShardIndex,
    },
    /// The card's newest stored change, read again: written again on `shard` (moved there from
    /// `from` when the stored copy is live elsewhere; children refreshed when `refresh`), and
    /// live leftovers of an interrupted move removed from every shard in `sweep`.
    Replay {
        /// The card's shard.
        shard: ShardIndex,
        /// The shard holding the stored live copy, when it is another one.
        from: Option<ShardIndex>,
        /// The children carry other fields than the change's.
        refresh: bool,
        /// Shards to clear of live copies of the card and its children.
        sweep: Vec<ShardIndex>,
    },
    /// The card's newest stored row is this change's delete marker on `from`: the move to `to`
    /// was cut short after the old shard's markers. The card is written on `to`, and live
    /// copies on `from` and every shard in `sweep` move to `to`.
    FinishMove {
        /// The old shard, holding the move's marker.
        from: ShardIndex,
        /// The new shard.
        to: ShardIndex,
        /// Other shards to clear.
        sweep: Vec<ShardIndex>,
    },
}

/// Why a plan cannot be carried out now.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Wait {
    /// Every buffered row must be acknowledged first (the plan reads stored rows back).
    Flush,
    /// The change parks for this reason.
    Park(ParkReason),
    /// The change can never apply: dead-letter it with this error.
    Poison(String),
}

/// The rows a plan writes, as steps the executor carries out in this order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Steps {
    /// The card row goes to this shard.
    pub card_on: Option<ShardIndex>,
    /// A delete marker for the card goes to this shard.
    pub card_marker_on: Option<ShardIndex>,
    /// The card's live children are read on the first shard and written, with the card's new
    /// fields, on the second (with delete markers on the first when they differ).
    pub children: Option<(ShardIndex, ShardIndex)>,
    /// Shards where live copies of the card are replaced by markers and its live children move
    /// to `card_on`.
    pub sweep: Vec<ShardIndex>,
}

/// True when the plan needs to know where the change's fields route (a delete of a card known
/// somewhere does not: the marker goes where the card is).
pub(crate) fn needs_placement(delete: bool, prev: Option<&CardState>) -> bool {
    !delete || prev.is_none()
}

/// Decides what a card change writes. `prev` is the card's state as this sink knows it (cache or
/// shards), `placement` where the change's fields route (`None` when [`needs_placement`] said
/// so), `flushed` whether every earlier row is acknowledged by its shard.
pub(crate) fn plan_card(
    change: &CardChange,
    prev: Option<&CardState>,
    placement: Option<&Placement>,
    shards: usize,
    flushed: bool,
) -> Result<CardPlan, Wait> {
    let stale = prev.is_some_and(|p| (p.version, p.seq) > change.stamp);
    if change.delete {
        return Ok(plan_delete(stale, prev, placement));
    }
    let (shard, conversation) = match placement {
        Some(Placement::Routed { shard, conversation }) => (*shard, conversation.as_ref()),
        Some(Placement::NotYet(reason)) => return Err(Wait::Park(reason.clone())),
        Some(Placement::Never(error)) => return Err(Wait::Poison(error.clone())),
        None => return Err(Wait::Poison("scorecard change routed nowhere".into())),
    };
    let Some(p) = prev else { return Ok(CardPlan::Write { shard }) };
    if stale {
        return Ok(CardPlan::Stale { rewrite_on: (p.shard == shard).then_some(shard) });
    }
    // A deleted card's children (those PostgreSQL kept) still live where the card was: a card
    // re-inserted with other routing or fields takes them along like any other change would.
    let moving = p.shard != shard;
    let refresh = p.fields != change.fields || p.conversation.as_ref() != conversation;
    // The very change the shards already hold as the card's newest (a re-read after a crash or
    // a rebalance). The newest stored row may be the move's marker on the old shard, when the
    // new shard's insert was the one lost.
    let replay = p.from_shards && p.version == change.stamp.0;
    if (moving || refresh || replay) && !flushed {
        return Err(Wait::Flush);
    }
    let others = |skip: &[ShardIndex]| (0..shards).filter(|s| !skip.contains(s)).collect();
    Ok(match (replay, moving) {
        (true, _) if p.deleted && p.shard != shard => {
            CardPlan::FinishMove { from: p.shard, to: shard, sweep: others(&[shard, p.shard]) }
        }
        (true, true) => CardPlan::Replay {
            shard,
            from: Some(p.shard),
            refresh,
            sweep: others(&[shard, p.shard]),
        },
        (true, false) => CardPlan::Replay { shard, from: None, refresh, sweep: others(&[shard]) },
        (false, true) => CardPlan::Move { from: p.shard, to: shard },
        (false, false) if refresh => CardPlan::Refresh { shard },
        (false, false) => CardPlan::Write { shard },
    })
}

fn plan_delete(stale: bool, prev: Option<&CardState>, placement: Option<&Placement>) -> CardPlan {
    if stale {
        return CardPlan::Nothing;
    }
    match (prev, placement) {
        (Some(p), _) => CardPlan::Delete { shard: p.shard },
        (None, Some(Placement::Routed { shard, .. })) => CardPlan::Delete { shard: *shard },
        // Not stored anywhere and not routable: there is nothing to delete.
        (None, _) => CardPlan::Nothing,
    }
}

impl CardPlan {
    /// The rows to write, in order.
    pub(crate) fn steps(&self) -> Steps {
        let none = Steps::default();
        match self {
            CardPlan::Nothing => none,
            CardPlan::Stale { rewrite_on } => Steps { card_on: *rewrite_on, ..none },
            CardPlan::Delete { shard } => Steps { card_marker_on: Some(*shard), ..none },
            CardPlan::Write { shard } => Steps { card_on: Some(*shard), ..none },
            CardPlan::Move { from, to } => Steps {
                card_on: Some(*to),
                card_marker_on: Some(*from),
                children: Some((*from, *to)),
                ..none
            },
            CardPlan::Refresh { shard } => {
                Steps { card_on: Some(*shard), children: Some((*shard, *shard)), ..none }
            }
            CardPlan::Replay { shard, from, refresh, sweep } => Steps {
                card_on: Some(*shard),
                card_marker_on: *from,
                children: match from {
                    Some(from) => Some((*from, *shard)),
                    None => refresh.then_some((*shard, *shard)),
                },
                sweep: sweep.clone(),
            },
            CardPlan::FinishMove { from, to, sweep } => Steps {
                card_on: Some(*to),
                sweep: std::iter::once(*from).chain(sweep.iter().copied()).collect(),
                ..none
            },
        }
    }

    /// The shard the card lives on once the plan is written (what the cache remembers), or `None`
    /// when the plan changes nothing this sink must remember (nothing written, or a stale change).
    pub(crate) fn lands_on(&self) -> Option<ShardIndex> {
        match self {
            CardPlan::Nothing | CardPlan::Stale { .. } => None,
            _ => {
                let steps = self.steps();
                steps.card_on.or(steps.card_marker_on)
            }
        }
    }

    /// True when the card is stored as deleted afterwards.
    pub(crate) fn deletes(&self) -> bool {
        matches!(self, CardPlan::Delete { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARDS: usize = 3;

    fn fields(conversation: &str) -> CardFields {
        CardFields {
            scorecard_type: Some(1),
            template_id: Some("t".into()),
            conversation_id: Some(conversation.into()),
            ..CardFields::default()
        }
    }

    fn conv(shard: ShardIndex) -> Conversation {
        Conversation { shard, start_time: 1_700_000_000, language_code: "en".into() }
    }

    /// The card as stored: on `shard` at `version`, with fields of conversation "c".
    fn stored(shard: ShardIndex, version: u64) -> CardState {
        CardState {
            version,
            seq: 0,
            fields: fields("c"),
            shard,
            conversation: Some(conv(shard)),
            deleted: false,
            from_shards: true,
        }
    }

    fn cached(shard: ShardIndex, version: u64) -> CardState {
        CardState { from_shards: false, ..stored(shard, version) }
    }

    fn upsert(version: u64, conversation: &str) -> CardChange {
        CardChange { stamp: (version, 0), delete: false, fields: fields(conversation) }
    }

    fn delete(version: u64) -> CardChange {
        CardChange { stamp: (version, 0), delete: true, fields: fields("c") }
    }

    fn routed(shard: ShardIndex) -> Placement {
        Placement::Routed { shard, conversation: Some(conv(shard)) }
    }

    fn plan(
        change: CardChange,
        prev: Option<CardState>,
        placement: Option<Placement>,
    ) -> Result<CardPlan, Wait> {
        plan_card(&change, prev.as_ref(), placement.as_ref(), SHARDS, true)
    }

    /// A name, the change, the previous state, the placement, and the expected plan.
    type Case =
        (&'static str, CardChange, Option<CardState>, Option<Placement>, Result<CardPlan, Wait>);

    #[test]
    fn plans_for_every_case() {
        use CardPlan::*;
        let not_yet = Placement::NotYet(ParkReason::ConversationNotFound("c".into()));
        let deleted_on = |shard, version| CardState { deleted: true, ..stored(shard, version) };
        let cases: Vec<Case> = vec![
            (
                "a new card is written where it routes",
                upsert(10, "c"),
                None,
                Some(routed(1)),
                Ok(Write { shard: 1 }),
            ),
            (
                "a newer change on the same shard with the same fields",
                upsert(20, "c"),
                Some(cached(1, 10)),
                Some(routed(1)),
                Ok(Write { shard: 1 }),
            ),
            (
                "routing moved: card and children move",
                upsert(20, "c"),
                Some(cached(0, 10)),
                Some(routed(2)),
                Ok(Move { from: 0, to: 2 }),
            ),
            (
                "fields children carry changed: children rewritten in place",
                upsert(20, "d"),
                Some(cached(1, 10)),
                Some(routed(1)),
                Ok(Refresh { shard: 1 }),
            ),
            (
                "older than stored, same shard: rewritten there only",
                upsert(5, "c"),
                Some(cached(1, 10)),
                Some(routed(1)),
                Ok(Stale { rewrite_on: Some(1) }),
            ),
            (
                "older than stored, other shard: written nowhere",
                upsert(5, "c"),
                Some(cached(1, 10)),
                Some(routed(0)),
                Ok(Stale { rewrite_on: None }),
            ),
            (
                "same version, earlier in the transaction: stale",
                CardChange { stamp: (10, 1), ..upsert(10, "c") },
                Some(CardState { seq: 2, ..cached(1, 10) }),
                Some(routed(0)),
                Ok(Stale { rewrite_on: None }),
            ),
            (
                "the stored newest change read again: sweep the other shards",
                upsert(10, "c"),
                Some(stored(1, 10)),
                Some(routed(1)),
                Ok(Replay { shard: 1, from: None, refresh: false, sweep: vec![0, 2] }),
            ),
            (
                "read again, stored live on another shard: move and sweep the rest",
                upsert(10, "c"),
                Some(stored(0, 10)),
                Some(routed(1)),
                Ok(Replay { shard: 1, from: Some(0), refresh: true, sweep: vec![2] }),
            ),
            (
                "read again, newest stored row is the move's marker on the old shard: finish the move",
                upsert(10, "c"),
                Some(deleted_on(0, 10)),
                Some(routed(2)),
                Ok(FinishMove { from: 0, to: 2, sweep: vec![1] }),
            ),
            (
                "re-insert after a delete, routed elsewhere: the children it kept move with it",
                upsert(20, "c"),
                Some(CardState { from_shards: false, ..deleted_on(0, 10) }),
                Some(routed(2)),
                Ok(Move { from: 0, to: 2 }),
            ),
            (
                "re-insert after a delete, same shard, other fields: its children refreshed",
                upsert(20, "d"),
                Some(CardState { from_shards: false, ..deleted_on(0, 10) }),
                Some(routed(0)),
                Ok(Refresh { shard: 0 }),
            ),
            (
                "re-insert after a delete, same shard, same fields: the card alone",
                upsert(20, "c"),
                Some(CardState { from_shards: false, ..deleted_on(0, 10) }),
                Some(routed(0)),
                Ok(Write { shard: 0 }),
            ),
            (
                "a change read again from the cache (not from the shards) is no replay",
                upsert(10, "c"),
                Some(cached(1, 10)),
                Some(routed(1)),
                Ok(Write { shard: 1 }),
            ),
            (
                "conversation on no shard yet: park",
                upsert(20, "c"),
                Some(cached(1, 10)),
                Some(not_yet.clone()),
                Err(Wait::Park(ParkReason::ConversationNotFound("c".into()))),
            ),
            (
                "unroutable: poison",
                upsert(20, "c"),
                None,
                Some(Placement::Never("no time".into())),
                Err(Wait::Poison("no time".into())),
            ),
            (
                "delete: marker where the card lives",
                delete(20),
                Some(cached(2, 10)),
                None,
                Ok(Delete { shard: 2 }),
            ),
            (
                "delete of a card known nowhere: marker where its old row routes",
                delete(20),
                None,
                Some(routed(1)),
                Ok(Delete { shard: 1 }),
            ),
            (
                "delete of a card known nowhere and not routable: nothing",
                delete(20),
                None,
                Some(not_yet),
                Ok(Nothing),
            ),
            ("stale delete: nothing", delete(5), Some(cached(2, 10)), None, Ok(Nothing)),
        ];
        for (name, change, prev, placement, expected) in cases {
            assert_eq!(plan(change, prev, placement), expected, "{name}");
        }
    }

    #[test]
    fn plans_that_read_stored_rows_wait_for_a_flush() {
        let moving = upsert(20, "c");
        let prev = cached(0, 10);
        let placed = routed(1);
        assert_eq!(plan_card(&moving, Some(&prev), Some(&placed), SHARDS, false), Err(Wait::Flush));
        let replayed = upsert(10, "c");
        let stored_prev = stored(1, 10);
        assert_eq!(
            plan_card(&replayed, Some(&stored_prev), Some(&placed), SHARDS, false),
            Err(Wait::Flush)
        );
        let plain = upsert(20, "c");
        let same = cached(1, 10);
        assert_eq!(
            plan_card(&plain, Some(&same), Some(&placed), SHARDS, false),
            Ok(CardPlan::Write { shard: 1 }),
            "a plain write needs no flush"
        );
    }

    #[test]
    fn placement_is_needed_unless_a_delete_knows_the_card() {
        assert!(needs_placement(false, Some(&cached(0, 1))));
        assert!(needs_placement(true, None));
        assert!(!needs_placement(true, Some(&cached(0, 1))));
    }

    #[test]
    fn steps_name_every_row_of_each_plan() {
        let steps = CardPlan::Move { from: 0, to: 2 }.steps();
        assert_eq!(steps.card_on, Some(2));
        assert_eq!(steps.card_marker_on, Some(0));
        assert_eq!(steps.children, Some((0, 2)));
        let finish = CardPlan::FinishMove { from: 0, to: 2, sweep: vec![1] }.steps();
        assert_eq!((finish.card_on, finish.card_marker_on), (Some(2), None));
        assert_eq!(finish.sweep, vec![0, 1], "the old shard is swept first");
        let replay = CardPlan::Replay { shard: 1, from: None, refresh: true, sweep: vec![0] };
        assert_eq!(replay.steps().children, Some((1, 1)));
        assert_eq!(CardPlan::Stale { rewrite_on: None }.steps(), Steps::default());
        assert_eq!(CardPlan::Delete { shard: 1 }.steps().card_marker_on, Some(1));
        assert!(CardPlan::Delete { shard: 1 }.deletes());
        assert_eq!(CardPlan::Delete { shard: 1 }.lands_on(), Some(1));
        assert_eq!(CardPlan::Move { from: 0, to: 2 }.lands_on(), Some(2));
        assert_eq!(
            CardPlan::Stale { rewrite_on: Some(1) }.lands_on(),
            None,
            "stale: not remembered"
        );
    }
}
