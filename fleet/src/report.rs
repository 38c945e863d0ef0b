//! Edge reports and the fleet's view of cell health.
//!
//! Every edge publishes an [`EdgeReport`] (its own view of every cell) at
//! `<prefix>edges/<edge>`, bound to a lease, so the report of an edge that
//! dies disappears when the lease expires. [`FleetHealth::aggregate`] turns
//! the live reports into the fleet's view: which edges are alive, how many
//! see each cell up or down, partial outages, and drain progress summed
//! over the fleet. Pure: "now" is an argument.
//!
//! # Partial outages and steering
//!
//! A cell is a **partial** outage when some live edges see it down and
//! others see it up: usually a network problem between some edges and the
//! cell, not a dead cell. With `fleet.partial_outage = "majority"` (the
//! default) a cell seen down by a strict majority of the live edges that
//! have a verdict on it (up or down, not unknown), and by at least two of
//! them, is treated as down on **every** edge ([`FleetHealth::overrule`]);
//! so DNS answers, which send clients straight to the cell from their own
//! networks, stop naming a cell most of the fleet cannot reach. A cell this
//! edge sees down is always down here, whatever the others say (it cannot
//! be reached from here). With `"local"` each edge steers by its own view
//! only and the partial outage is just shown. One edge alone, or two that
//! disagree, never overrule anybody.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use cellgate_config::{CellId, PartialOutage};
use cellgate_routing::{CellMeasurement, Health, Measurements, Timestamp};
use serde::{Deserialize, Serialize};

use crate::record::time;

/// One edge's view of every cell, published at `<prefix>edges/<edge>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EdgeReport {
    pub edge: String,
    /// When the report was made (the edge's clock).
    #[serde(with = "time")]
    pub at: Timestamp,
    /// The edge's routing table generation.
    #[serde(default)]
    pub table_generation: u64,
    /// The fleet intent revision the edge applies: edges that agree on it
    /// have converged.
    #[serde(default)]
    pub intent_revision: i64,
    pub cells: Vec<CellReport>,
}

/// One cell as seen from one edge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CellReport {
    pub cell: CellId,
    #[serde(with = "health")]
    pub health: Health,
    #[serde(default)]
    pub endpoints: Vec<EndpointReport>,
    /// Smoothed probe round-trip time, milliseconds.
    #[serde(default)]
    pub srtt_ms: Option<f64>,
    /// Utilisation 0..=1 reported by the cell.
    #[serde(default)]
    pub load: Option<f64>,
    /// Requests in flight from this edge to the cell now.
    #[serde(default)]
    pub in_flight: u64,
    /// Proxied requests per second (last 10 s).
    #[serde(default)]
    pub requests_per_s: f64,
    /// Requests that carried a sticky cookie naming the cell (last 10 min):
    /// the sessions a drain still has to move.
    #[serde(default)]
    pub sticky_sessions: u64,
    /// DNS answers naming the cell (last 10 s).
    #[serde(default)]
    pub dns_answers: u64,
}

impl CellReport {
    /// A report of a cell's measurement; the traffic figures are zero for
    /// the caller to fill in.
    pub fn from_measurement(cell: CellId, m: &CellMeasurement) -> Self {
        Self {
            cell,
            health: m.health,
            endpoints: m
                .endpoints
                .iter()
                .map(|e| EndpointReport {
                    addr: e.addr,
                    health: e.health,
                    ejected: e.ejected,
                })
                .collect(),
            srtt_ms: m.srtt.map(|d| d.as_secs_f64() * 1000.0),
            load: m.load,
            in_flight: 0,
            requests_per_s: 0.0,
            sticky_sessions: 0,
            dns_answers: 0,
        }
    }
}

/// One endpoint of a cell as seen from one edge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointReport {
    pub addr: SocketAddr,
    #[serde(with = "health")]
    pub health: Health,
    /// Ejected by passive health (real-traffic failures).
    #[serde(default)]
    pub ejected: bool,
}

/// The fleet's verdict on a cell, from the live edges' reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FleetVerdict {
    /// Every live edge with a verdict sees it up.
    Up,
    /// Every live edge with a verdict sees it down.
    Down,
    /// Some live edges see it down, others up.
    Partial,
    /// No live edge has a verdict.
    Unknown,
}

/// One edge in the fleet view.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EdgeStatus {
    pub edge: String,
    #[serde(with = "time")]
    pub last_report: Timestamp,
    /// Age of the last report, milliseconds.
    pub age_ms: u64,
    /// The report is present and younger than the aggregation's `max_age`.
    pub alive: bool,
    pub intent_revision: i64,
}

/// One cell in the fleet view: what the live edges see, and the fleet's
/// traffic to it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CellStatus {
    pub cell: CellId,
    pub verdict: FleetVerdict,
    pub up: u32,
    pub down: u32,
    pub unknown: u32,
    /// Live edges that see it down, by name.
    pub seen_down_by: Vec<String>,
    /// Summed over live edges: what a drain still has to move.
    pub in_flight: u64,
    pub sticky_sessions: u64,
    pub requests_per_s: f64,
    pub dns_answers: u64,
}

impl CellStatus {
    /// Whether `rule` treats the cell as down on every edge.
    pub fn down_everywhere(&self, rule: PartialOutage) -> bool {
        match rule {
            PartialOutage::Local => false,
            PartialOutage::Majority => self.down >= 2 && self.down > self.up,
        }
    }
}

/// The fleet's view of its edges and cells.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FleetHealth {
    /// Every reporting edge, by name.
    pub edges: Vec<EdgeStatus>,
    /// Every cell any live edge reports, by id.
    pub cells: Vec<CellStatus>,
}

impl FleetHealth {
    /// Aggregates the reports present in etcd. A report older than
    /// `max_age` (by its own timestamp, so edge clocks should agree within a
    /// fraction of it) counts as not alive and is left out of the cells.
    pub fn aggregate<'a>(reports: impl IntoIterator<Item = &'a EdgeReport>, now: Timestamp, max_age: Duration) -> Self {
        let mut edges = Vec::new();
        let mut cells: BTreeMap<CellId, CellStatus> = BTreeMap::new();
        for r in reports {
            let age = now.since(r.at);
            let alive = age <= max_age;
            edges.push(EdgeStatus {
                edge: r.edge.clone(),
                last_report: r.at,
                age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                alive,
                intent_revision: r.intent_revision,
            });
            if !alive {
                continue;
            }
            for c in &r.cells {
                let s = cells.entry(c.cell.clone()).or_insert_with(|| CellStatus {
                    cell: c.cell.clone(),
                    verdict: FleetVerdict::Unknown,
                    up: 0,
                    down: 0,
                    unknown: 0,
                    seen_down_by: Vec::new(),
                    in_flight: 0,
                    sticky_sessions: 0,
                    requests_per_s: 0.0,
                    dns_answers: 0,
                });
                match c.health {
                    Health::Up => s.up += 1,
                    Health::Down => {
                        s.down += 1;
                        s.seen_down_by.push(r.edge.clone());
                    }
                    Health::Unknown => s.unknown += 1,
                }
                s.in_flight += c.in_flight;
                s.sticky_sessions += c.sticky_sessions;
                s.requests_per_s += c.requests_per_s;
                s.dns_answers += c.dns_answers;
            }
        }
        for s in cells.values_mut() {
            s.verdict = match (s.up, s.down) {
                (0, 0) => FleetVerdict::Unknown,
                (_, 0) => FleetVerdict::Up,
                (0, _) => FleetVerdict::Down,
                _ => FleetVerdict::Partial,
            };
            s.seen_down_by.sort();
        }
        edges.sort_by(|a, b| a.edge.cmp(&b.edge));
        Self {
            edges,
            cells: cells.into_values().collect(),
        }
    }

    pub fn cell(&self, id: &str) -> Option<&CellStatus> {
        self.cells.iter().find(|c| c.cell.as_str() == id)
    }

    /// Live edges.
    pub fn alive(&self) -> usize {
        self.edges.iter().filter(|e| e.alive).count()
    }

    /// Cells `rule` treats as down on every edge.
    pub fn down_everywhere(&self, rule: PartialOutage) -> Vec<CellId> {
        self.cells
            .iter()
            .filter(|c| c.down_everywhere(rule))
            .map(|c| c.cell.clone())
            .collect()
    }

    /// Applies `rule` to this edge's measurements before a table build:
    /// marks down the cells the fleet treats as down everywhere (`index`
    /// maps a cell id to its position in `m`, the config's order). Returns
    /// the cells it changed (those this edge did not already see down).
    pub fn overrule(
        &self,
        rule: PartialOutage,
        index: impl Fn(&str) -> Option<usize>,
        m: &mut Measurements,
    ) -> Vec<CellId> {
        let mut changed = Vec::new();
        for id in self.down_everywhere(rule) {
            if let Some(cm) = index(id.as_str()).and_then(|i| m.cells.get_mut(i)) {
                if cm.effective_health() != Health::Down {
                    cm.fleet_down = true;
                    changed.push(id);
                }
            }
        }
        changed
    }
}

mod health {
    use cellgate_routing::Health;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(h: &Health, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match h {
            Health::Up => "up",
            Health::Down => "down",
            Health::Unknown => "unknown",
        })
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Health, D::Error> {
        // A newer edge's state this one does not know counts as unknown.
        Ok(match String::deserialize(d)?.as_str() {
            "up" => Health::Up,
            "down" => Health::Down,
            _ => Health::Unknown,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(edge: &str, at_ms: u64, cells: &[(&str, Health, u64, u64)]) -> EdgeReport {
        EdgeReport {
            edge: edge.into(),
            at: Timestamp::from_unix_millis(at_ms),
            table_generation: 1,
            intent_revision: 5,
            cells: cells
                .iter()
                .map(|&(c, health, in_flight, sticky)| CellReport {
                    in_flight,
                    sticky_sessions: sticky,
                    requests_per_s: 10.0,
                    health,
                    ..CellReport::from_measurement(CellId::new(c), &CellMeasurement::default())
                })
                .collect(),
        }
    }

    const NOW: u64 = 1_000_000;
    const AGE: Duration = Duration::from_secs(10);

    #[test]
    fn verdicts_counts_and_drain_progress() {
        use Health::*;
        let reports = [
            report(
                "a",
                NOW - 1000,
                &[("eu", Up, 3, 7), ("us", Down, 0, 0), ("ap", Unknown, 0, 0)],
            ),
            report(
                "b",
                NOW - 2000,
                &[("eu", Up, 4, 1), ("us", Up, 2, 0), ("ap", Unknown, 0, 0)],
            ),
            // Dead: its report is older than max_age and counts for nothing.
            report("c", NOW - 60_000, &[("eu", Down, 100, 100), ("gone", Down, 0, 0)]),
        ];
        let h = FleetHealth::aggregate(&reports, Timestamp::from_unix_millis(NOW), AGE);
        assert_eq!(h.alive(), 2);
        assert_eq!(
            h.edges.iter().map(|e| (e.edge.as_str(), e.alive)).collect::<Vec<_>>(),
            [("a", true), ("b", true), ("c", false)]
        );
        assert_eq!(h.edges[1].age_ms, 2000);
        let eu = h.cell("eu").expect("eu");
        assert_eq!((eu.verdict, eu.up, eu.down), (FleetVerdict::Up, 2, 0));
        assert_eq!((eu.in_flight, eu.sticky_sessions, eu.requests_per_s), (7, 8, 20.0));
        let us = h.cell("us").expect("us");
        assert_eq!(us.verdict, FleetVerdict::Partial);
        assert_eq!(us.seen_down_by, ["a"]);
        assert_eq!(
            h.cell("ap").map(|c| (c.verdict, c.unknown)),
            Some((FleetVerdict::Unknown, 2))
        );
        assert!(h.cell("gone").is_none());
    }

    #[test]
    fn a_majority_of_live_edges_takes_a_partially_down_cell_out_everywhere() {
        use Health::*;
        let now = Timestamp::from_unix_millis(NOW);
        // 2 of 3 see `us` down: a partial outage the majority rule acts on.
        let three = [
            report("a", NOW, &[("us", Down, 0, 0), ("eu", Up, 0, 0)]),
            report("b", NOW, &[("us", Down, 0, 0), ("eu", Down, 0, 0)]),
            report("c", NOW, &[("us", Up, 0, 0), ("eu", Up, 0, 0)]),
        ];
        let h = FleetHealth::aggregate(&three, now, AGE);
        assert_eq!(h.cell("us").map(|c| c.verdict), Some(FleetVerdict::Partial));
        assert_eq!(h.down_everywhere(PartialOutage::Majority), [CellId::new("us")]);
        assert!(h.down_everywhere(PartialOutage::Local).is_empty());
        // Edge c sees `us` up; the majority rule marks it down in c's table.
        let mut m = Measurements::default();
        let order = ["us", "eu"];
        for _ in order {
            m.cells.push(CellMeasurement {
                health: Up,
                ..Default::default()
            });
        }
        let index = |id: &str| order.iter().position(|c| *c == id);
        assert_eq!(h.overrule(PartialOutage::Majority, index, &mut m), [CellId::new("us")]);
        assert_eq!(m.cells[0].effective_health(), Down);
        assert_eq!(m.cells[1].effective_health(), Up);
        // Two edges that disagree overrule nobody; nor does one edge alone,
        // nor a majority made of unknowns.
        let two = [
            report("a", NOW, &[("us", Down, 0, 0)]),
            report("b", NOW, &[("us", Up, 0, 0)]),
        ];
        assert!(FleetHealth::aggregate(&two, now, AGE)
            .down_everywhere(PartialOutage::Majority)
            .is_empty());
        let one = [report("a", NOW, &[("us", Down, 0, 0)])];
        assert!(FleetHealth::aggregate(&one, now, AGE)
            .down_everywhere(PartialOutage::Majority)
            .is_empty());
        let unknowns = [
            report("a", NOW, &[("us", Down, 0, 0)]),
            report("b", NOW, &[("us", Down, 0, 0)]),
            report("c", NOW, &[("us", Up, 0, 0)]),
            report("d", NOW, &[("us", Up, 0, 0)]),
            report("e", NOW, &[("us", Unknown, 0, 0)]),
        ];
        assert!(FleetHealth::aggregate(&unknowns, now, AGE)
            .down_everywhere(PartialOutage::Majority)
            .is_empty());
        // Dead edges do not vote.
        let dead = [
            report("a", NOW, &[("us", Down, 0, 0)]),
            report("b", NOW - 60_000, &[("us", Down, 0, 0)]),
            report("c", NOW, &[("us", Up, 0, 0)]),
        ];
        assert!(FleetHealth::aggregate(&dead, now, AGE)
            .down_everywhere(PartialOutage::Majority)
            .is_empty());
    }

    #[test]
    fn reports_round_trip_and_tolerate_newer_fields() {
        let mut r = report("a", NOW, &[("eu", Health::Up, 1, 2)]);
        r.cells[0].endpoints.push(EndpointReport {
            addr: "127.0.0.1:80".parse().expect("addr"),
            health: Health::Down,
            ejected: true,
        });
        let json = serde_json::to_string(&r).expect("json");
        assert_eq!(serde_json::from_str::<EdgeReport>(&json).expect("back"), r);
        let newer = json.replace(r#""health":"up""#, r#""health":"degraded","zone":"z1""#);
        let back: EdgeReport = serde_json::from_str(&newer).expect("newer");
        assert_eq!(back.cells[0].health, Health::Unknown);
    }
}
