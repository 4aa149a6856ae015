//! Experiments: a grid of `simulate` runs with seeds ([`grid`]), run several at once and
//! recorded as JSON lines ([`runner`]), reported as tables with mean ± std and the change
//! against data-parallel ([`report`]) and as SVG plots ([`plot`]); and the bandwidth and
//! compute-utilization calculator `plan` ([`plan`]).

pub mod grid;
pub mod plan;
pub mod plot;
pub mod report;
pub mod runner;

use std::path::{Path, PathBuf};

/// What [`write_report`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// The markdown file.
    pub path: PathBuf,
    /// Rows in its tables.
    pub rows: usize,
    /// SVG plots next to it.
    pub plots: usize,
}

/// Reads the result files, and writes `dir/report.md` with the plots it links.
pub fn write_report(
    results: &[PathBuf],
    dir: &Path,
    title: &str,
) -> Result<Written, runner::StudyError> {
    let mut lines = Vec::new();
    for r in results {
        lines.extend(runner::load(r)?);
    }
    if lines.is_empty() {
        return Err(runner::StudyError::NoResults(
            results.first().cloned().unwrap_or_default(),
        ));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| runner::StudyError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let rows = report::rows(&lines);
    let mut plots = Vec::new();
    if plot::loss_vs_tokens(&rows, &dir.join("loss_vs_tokens.svg"), title)? {
        plots.push((
            "loss_vs_tokens.svg".into(),
            "eval loss against tokens".into(),
        ));
    }
    if plot::vs_dp_by_m(&rows, &dir.join("vs_dp.svg"), title)? {
        plots.push((
            "vs_dp.svg".into(),
            "change against data-parallel by M".into(),
        ));
    }
    let files = results
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let shown = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let command = format!(
        "diloco-node study report {files} --out {} --title {title:?}",
        shown.display()
    );
    let path = dir.join("report.md");
    std::fs::write(&path, report::markdown(title, &rows, &command, &plots)).map_err(io(&path))?;
    Ok(Written {
        path,
        rows: rows.len(),
        plots: plots.len(),
    })
}
