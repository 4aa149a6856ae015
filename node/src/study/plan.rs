//! `diloco-node plan`: how much of its time a run computes (compute utilization, CU) under
//! data-parallel and under DiLoCo, and the link bandwidth each needs for a target CU.
//!
//! The model is the idealised wall-clock model of "Scaling Laws for DiLoCo" (arXiv 2503.09799,
//! appendix "Wall-Clock Time Model"): a bandwidth-optimal all-reduce of `N` values of `b` bits
//! among `R` peers over links of `W` bit/s with latency `ε` takes
//!
//! ```text
//! T_sync = 2 · N · b · (1 − 1/R) / W + ε
//! ```
//!
//! Data-parallel syncs every step; DiLoCo once per `H` steps, with `b` the codec's bits per
//! value (block scales included). A fraction `overlap` of a step's compute time `S` can hide a
//! sync (0 in the paper's appendix; about 2/3, the backward pass, in the Streaming DiLoCo
//! simulator that made the paper's bandwidth table). Per sync period of `k` steps (`k` = 1 for
//! DP, `H` for DiLoCo):
//!
//! ```text
//! exposed = max(0, T_sync − overlap · S)          CU = k·S / (k·S + exposed)
//! W needed for CU u:  2·N·b·(1 − 1/R) / (k·S·(1 − u)/u + overlap·S − ε)
//! ```
//!
//! docs/STUDY.md checks it against the paper's table row for a 10B model.

use std::fmt::Write;

/// Inputs of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Parameters N.
    pub params: f64,
    /// Compute seconds of one inner step S.
    pub step_time: f64,
    /// Inner steps per DiLoCo round H.
    pub inner_steps: u64,
    /// Bits per value DiLoCo sends (codec, block scales included).
    pub diloco_bits: f64,
    /// Bits per gradient value data-parallel sends (16: bf16 gradients, as in the paper).
    pub dp_bits: f64,
    /// Peers R in the all-reduce.
    pub peers: u64,
    /// Link bandwidth W in bit/s.
    pub bandwidth: f64,
    /// Latency ε of one all-reduce in seconds.
    pub latency: f64,
    /// Fraction of a step's compute that can hide a sync.
    pub overlap: f64,
}

/// A bandwidth for people: Gbit/s from 1 Gbit/s up, Mbit/s below.
pub fn rate(bits_per_s: f64) -> String {
    if bits_per_s >= 1e9 {
        format!("{:.2} Gbit/s", bits_per_s / 1e9)
    } else {
        format!("{:.2} Mbit/s", bits_per_s / 1e6)
    }
}

/// Compute utilizations at which the report gives the bandwidth needed.
pub const TARGETS: [f64; 5] = [0.5, 0.8, 0.9, 0.95, 0.99];

impl Plan {
    fn volume(&self, bits: f64) -> f64 {
        if self.peers <= 1 {
            return 0.0;
        }
        2.0 * self.params * bits * (1.0 - 1.0 / self.peers as f64)
    }

    fn sync_time(&self, bits: f64) -> f64 {
        if self.peers <= 1 {
            return 0.0;
        }
        self.volume(bits) / self.bandwidth + self.latency
    }

    /// CU with syncs of `bits` per value every `k` steps.
    pub fn utilization(&self, bits: f64, k: u64) -> f64 {
        let compute = k as f64 * self.step_time;
        let exposed = (self.sync_time(bits) - self.overlap * self.step_time).max(0.0);
        compute / (compute + exposed)
    }

    /// Bandwidth (bit/s) needed for CU `u` with syncs of `bits` every `k` steps; `None` when no
    /// bandwidth reaches it (the latency alone is too long), `Some(0)` with one peer.
    pub fn bandwidth_for(&self, bits: f64, k: u64, u: f64) -> Option<f64> {
        if self.peers <= 1 {
            return Some(0.0);
        }
        let allowed = k as f64 * self.step_time * (1.0 - u) / u + self.overlap * self.step_time
            - self.latency;
        (allowed > 0.0).then(|| self.volume(bits) / allowed)
    }

    /// The report `plan` prints.
    pub fn report(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "N = {:.3e} parameters, step {:.3} s, H = {}, {} peers, link {}, latency {:.1} ms, overlap {:.2} of a step",
            self.params,
            self.step_time,
            self.inner_steps,
            self.peers,
            rate(self.bandwidth),
            self.latency * 1e3,
            self.overlap
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| method | bits/value | sent per peer per sync | sync time | CU at this link | {} |",
            TARGETS
                .iter()
                .map(|u| format!("link for {:.0} % CU", u * 100.0))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(s, "|---|---|---|---|---|{}", "---|".repeat(TARGETS.len()));
        for (name, bits, k) in [
            ("data-parallel".to_string(), self.dp_bits, 1),
            (
                format!("DiLoCo H={}", self.inner_steps),
                self.diloco_bits,
                self.inner_steps,
            ),
        ] {
            let needed = TARGETS
                .iter()
                .map(|&u| match self.bandwidth_for(bits, k, u) {
                    Some(w) => rate(w),
                    None => "unreachable (latency)".into(),
                })
                .collect::<Vec<_>>()
                .join(" | ");
            let _ = writeln!(
                s,
                "| {name} | {bits} | {:.1} MB | {:.3} s | {:.1} % | {needed} |",
                self.volume(bits) / 8.0 / 1e6,
                self.sync_time(bits),
                self.utilization(bits, k) * 100.0,
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ten_b() -> Plan {
        // "Scaling Laws for DiLoCo", bandwidth table: a 10B model at 0.8 s a step.
        Plan {
            params: 10e9,
            step_time: 0.8,
            inner_steps: 100,
            diloco_bits: 16.0,
            dp_bits: 16.0,
            peers: 2,
            bandwidth: 100e9,
            latency: 0.0,
            overlap: 2.0 / 3.0,
        }
    }

    #[test]
    fn utilization_and_needed_bandwidth_agree() {
        let p = ten_b();
        for (bits, k) in [(16.0, 1), (16.0, 100), (4.0, 30)] {
            for u in TARGETS {
                let w = p.bandwidth_for(bits, k, u).unwrap();
                let at = Plan {
                    bandwidth: w,
                    ..p.clone()
                };
                assert!((at.utilization(bits, k) - u).abs() < 1e-9, "{bits} {k} {u}");
            }
        }
    }

    #[test]
    fn the_papers_ten_b_row_within_a_factor_of_1_5() {
        // Published (Gbit/s; the table reports the smallest value of a log grid that reaches
        // the CU): data-parallel 104.8 / 184.2 / 222.3 / 222.3 / 390.7,
        // DiLoCo H=100 1.4 / 6.2 / 13.3 / 23.3 / 86.8 for 50 / 80 / 90 / 95 / 99 % CU.
        let p = ten_b();
        let dp = [104.8, 184.2, 222.3, 222.3, 390.7];
        let diloco = [1.4, 6.2, 13.3, 23.3, 86.8];
        for (i, u) in TARGETS.iter().enumerate() {
            let ours_dp = p.bandwidth_for(16.0, 1, *u).unwrap() / 1e9;
            let ours_dl = p.bandwidth_for(16.0, 100, *u).unwrap() / 1e9;
            let r_dp = ours_dp / dp[i];
            let r_dl = ours_dl / diloco[i];
            // Ours asks for 1.15-1.45x the paper's simulator up to 95 % (0.76x for DP at 99 %).
            assert!(
                (1.0 / 1.5..1.5).contains(&r_dp),
                "DP at {u}: ours {ours_dp} vs {}",
                dp[i]
            );
            assert!(
                (1.0 / 1.5..1.5).contains(&r_dl),
                "DiLoCo at {u}: ours {ours_dl} vs {}",
                diloco[i]
            );
        }
        // And the headline: DiLoCo needs orders of magnitude less bandwidth at 90 % CU.
        let ratio =
            p.bandwidth_for(16.0, 1, 0.9).unwrap() / p.bandwidth_for(16.0, 100, 0.9).unwrap();
        assert!(
            (13.0..20.0).contains(&ratio),
            "{ratio} (the paper's table: 222.3 / 13.3 = 16.7)"
        );
    }

    #[test]
    fn latency_can_make_a_target_unreachable() {
        let p = Plan {
            latency: 0.5,
            overlap: 0.0,
            step_time: 0.1,
            ..ten_b()
        };
        assert_eq!(p.bandwidth_for(16.0, 1, 0.9), None);
        assert!(p.bandwidth_for(16.0, 100, 0.9).is_some());
        let one = Plan {
            peers: 1,
            ..ten_b()
        };
        assert_eq!(one.utilization(16.0, 1), 1.0);
        assert_eq!(one.bandwidth_for(16.0, 1, 0.99), Some(0.0));
        assert!(p.report().contains("unreachable (latency)"));
    }
}
