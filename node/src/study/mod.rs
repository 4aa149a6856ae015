//! Experiments: a grid of `simulate` runs with seeds ([`grid`]), run several at once and
//! recorded as JSON lines ([`runner`]), reported as tables with mean ± std and the change
//! against data-parallel ([`report`]) and as SVG plots ([`plot`]); and the bandwidth and
//! compute-utilization calculator `plan` ([`plan`]).

pub mod grid;
pub mod plan;
pub mod plot;
pub mod report;
pub mod runner;
