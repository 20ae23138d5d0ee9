//! The order state machine. Orders are born `reserved` (the stock reservation commits in the order's own
//! transaction; `created` names the instant inside that transaction and is never stored), then:
//!
//! ```text
//! reserved -> paid -> fulfilled
//!    |          |        |
//!    |          +--------+--> refunded
//!    +--> cancelled | expired
//! ```
//!
//! Every transition is a conditional update on the stored status, so two processes racing on one order
//! (a sweeper expiring it while a buyer pays) cannot both win. A partial refund is no transition: the order
//! stays `paid` or `fulfilled` (its lines count their refunded units) and takes `refund` only with the refund
//! that leaves no unit unrefunded.

use serde::{Deserialize, Serialize};

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Created,
    Reserved,
    Paid,
    Fulfilled,
    Cancelled,
    Expired,
    Refunded,
}

/// An action on an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Reserve,
    Pay,
    Fulfil,
    Cancel,
    Expire,
    Refund,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Reserve => "reserve",
            Transition::Pay => "pay",
            Transition::Fulfil => "fulfil",
            Transition::Cancel => "cancel",
            Transition::Expire => "expire",
            Transition::Refund => "refund",
        }
    }
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Created => "created",
            OrderStatus::Reserved => "reserved",
            OrderStatus::Paid => "paid",
            OrderStatus::Fulfilled => "fulfilled",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Expired => "expired",
            OrderStatus::Refunded => "refunded",
        }
    }

    pub fn parse(s: &str) -> Option<OrderStatus> {
        Some(match s {
            "created" => OrderStatus::Created,
            "reserved" => OrderStatus::Reserved,
            "paid" => OrderStatus::Paid,
            "fulfilled" => OrderStatus::Fulfilled,
            "cancelled" => OrderStatus::Cancelled,
            "expired" => OrderStatus::Expired,
            "refunded" => OrderStatus::Refunded,
            _ => return None,
        })
    }

    /// The state after `t`, or `None` when `t` is not allowed from here.
    pub fn apply(self, t: Transition) -> Option<OrderStatus> {
        use OrderStatus::*;
        use Transition::*;
        match (self, t) {
            (Created, Reserve) => Some(Reserved),
            (Created | Reserved, Cancel) => Some(Cancelled),
            (Reserved, Pay) => Some(Paid),
            (Reserved, Expire) => Some(Expired),
            (Paid, Fulfil) => Some(Fulfilled),
            (Paid | Fulfilled, Refund) => Some(Refunded),
            _ => None,
        }
    }

    /// Whether the order's stock is held as reserved.
    pub fn holds_reservation(self) -> bool {
        self == OrderStatus::Reserved
    }

    /// Whether the order's stock counts as sold.
    pub fn counts_as_sold(self) -> bool {
        matches!(self, OrderStatus::Paid | OrderStatus::Fulfilled)
    }
}

/// A regular order or a flash-sale purchase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderKind {
    Regular,
    Seckill,
}

impl OrderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderKind::Regular => "regular",
            OrderKind::Seckill => "seckill",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [OrderStatus; 7] = [
        OrderStatus::Created,
        OrderStatus::Reserved,
        OrderStatus::Paid,
        OrderStatus::Fulfilled,
        OrderStatus::Cancelled,
        OrderStatus::Expired,
        OrderStatus::Refunded,
    ];
    const ACTIONS: [Transition; 6] = [
        Transition::Reserve,
        Transition::Pay,
        Transition::Fulfil,
        Transition::Cancel,
        Transition::Expire,
        Transition::Refund,
    ];

    #[test]
    fn terminal_states_accept_nothing() {
        for s in [
            OrderStatus::Cancelled,
            OrderStatus::Expired,
            OrderStatus::Refunded,
        ] {
            for t in ACTIONS {
                assert_eq!(s.apply(t), None, "{s:?} {t:?}");
            }
        }
    }

    #[test]
    fn exactly_the_documented_edges() {
        let mut edges = Vec::new();
        for s in ALL {
            for t in ACTIONS {
                if let Some(n) = s.apply(t) {
                    edges.push((s.as_str(), t.as_str(), n.as_str()));
                }
            }
        }
        assert_eq!(edges.len(), 8, "{edges:?}");
        // A reservation ends exactly one way: paid, cancelled or expired.
        assert_eq!(
            OrderStatus::Reserved.apply(Transition::Expire),
            Some(OrderStatus::Expired)
        );
        assert_eq!(OrderStatus::Expired.apply(Transition::Pay), None);
        assert_eq!(OrderStatus::Paid.apply(Transition::Expire), None);
    }

    #[test]
    fn status_names_round_trip() {
        for s in ALL {
            assert_eq!(OrderStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(OrderStatus::parse("lost"), None);
    }
}
