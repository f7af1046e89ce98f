//! Minimal SVG line plots, written by `zoo report` beside the tables.

use std::fmt::Write;

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [&str; 10] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

/// A line chart with axes, ticks and a legend. Non-finite points are skipped.
pub fn line_chart(title: &str, xlabel: &str, ylabel: &str, series: &[Series], log_y: bool) -> String {
    line_chart_axes(title, xlabel, ylabel, series, false, log_y)
}

/// [`line_chart`] with a choice of log scale on either axis (positive values only on a log axis).
pub fn line_chart_axes(title: &str, xlabel: &str, ylabel: &str, series: &[Series], log_x: bool, log_y: bool) -> String {
    if log_x {
        let logged: Vec<Series> = series
            .iter()
            .map(|s| Series {
                name: s.name.clone(),
                points: s.points.iter().filter(|p| p.0 > 0.0).map(|&(x, y)| (x.log10(), y)).collect(),
            })
            .collect();
        return chart(title, xlabel, ylabel, &logged, true, log_y);
    }
    chart(title, xlabel, ylabel, series, false, log_y)
}

/// `x_is_log10`: x values are log₁₀ of the data; tick labels show 10^x.
fn chart(title: &str, xlabel: &str, ylabel: &str, series: &[Series], x_is_log10: bool, log_y: bool) -> String {
    let (w, h, l, r, t, b) = (760.0, 440.0, 70.0, 220.0, 40.0, 50.0);
    let fy = |y: f64| if log_y { y.max(1e-12).log10() } else { y };
    let pts: Vec<(f64, f64)> =
        series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        (l + w - r) / 2.0,
        esc(title)
    );
    if pts.is_empty() {
        svg.push_str("</svg>");
        return svg;
    }
    let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(fy(p.1)), b.max(fy(p.1))));
    if x1 == x0 {
        x1 += 1.0;
        x0 -= 1.0;
    }
    if y1 == y0 {
        y1 += 0.5;
        y0 -= 0.5;
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let px = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let py = |y: f64| h - b - (fy(y) - y0) / (y1 - y0) * (h - t - b);
    let _ = write!(
        svg,
        r##"<line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="#333"/><line x1="{l}" y1="{t}" x2="{l}" y2="{}" stroke="#333"/>"##,
        h - b,
        w - r,
        h - b,
        h - b
    );
    for i in 0..=5 {
        let xv = x0 + (x1 - x0) * i as f64 / 5.0;
        let yv = y0 + (y1 - y0) * i as f64 / 5.0;
        let ylab = if log_y { 10f64.powf(yv) } else { yv };
        let xlab = if x_is_log10 { num(10f64.powf(xv)) } else { num(xv) };
        let _ = write!(svg, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, px(xv), h - b + 16.0, xlab);
        let ypix = h - b - (yv - y0) / (y1 - y0) * (h - t - b);
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><line x1="{l}" y1="{ypix}" x2="{}" y2="{ypix}" stroke="#eee"/>"##,
            l - 6.0,
            ypix + 4.0,
            num(ylab),
            w - r
        );
    }
    let _ =
        write!(svg, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, (l + w - r) / 2.0, h - 12.0, esc(xlabel));
    let _ = write!(
        svg,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        (t + h - b) / 2.0,
        (t + h - b) / 2.0,
        esc(ylabel)
    );
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = write!(svg, r#"<polyline fill="none" stroke="{c}" stroke-width="1.8" points="{}"/>"#, path.join(" "));
        for p in &path {
            let (x, y) = p.split_once(',').unwrap();
            let _ = write!(svg, r#"<circle cx="{x}" cy="{y}" r="2.2" fill="{c}"/>"#);
        }
        let ly = t + 14.0 + 18.0 * i as f64;
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="14" height="3" fill="{c}"/><text x="{}" y="{}">{}</text>"#,
            w - r + 12.0,
            ly - 4.0,
            w - r + 32.0,
            ly,
            esc(&s.name)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn num(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{:.0}", v)
    } else if v.abs() >= 10.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.3}", v)
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// One panel of [`heatmaps`]: `values[row][col]`, rows split into groups of `group` (a thin
/// line between groups), columns labelled by `cols`.
pub struct HeatPanel {
    pub title: String,
    pub cols: Vec<f64>,
    pub values: Vec<Vec<f64>>,
    pub group: usize,
}

/// Heatmap panels side by side (`per_row` to a row of panels), one colour scale for all: white
/// at 0, dark red at `vmax` and above; `row_label` names the rows, `note` explains the scale.
pub fn heatmaps(title: &str, row_label: &str, col_label: &str, note: &str, panels: &[HeatPanel], vmax: f64, per_row: usize) -> String {
    let (pw, ph, gap, top, left) = (170.0, 190.0, 26.0, 56.0, 46.0);
    let per_row = per_row.max(1);
    let n_rows = panels.len().div_ceil(per_row).max(1);
    let w = left + per_row as f64 * (pw + gap) + 10.0;
    let h = top + n_rows as f64 * (ph + 56.0) + 10.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>"#
    );
    let _ = write!(svg, r#"<text x="{}" y="20" text-anchor="middle" font-size="15">{}</text>"#, w / 2.0, esc(title));
    let _ = write!(svg, r##"<text x="{}" y="38" text-anchor="middle" fill="#555">{}</text>"##, w / 2.0, esc(note));
    for (i, p) in panels.iter().enumerate() {
        let (x0, y0) = (left + (i % per_row) as f64 * (pw + gap), top + (i / per_row) as f64 * (ph + 56.0) + 16.0);
        let _ = write!(svg, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, x0 + pw / 2.0, y0 - 4.0, esc(&p.title));
        let (nr, nc) = (p.values.len(), p.cols.len());
        if nr == 0 || nc == 0 {
            continue;
        }
        let (cw, ch) = (pw / nc as f64, ph / nr as f64);
        for (r, row) in p.values.iter().enumerate() {
            for (c, &v) in row.iter().enumerate().take(nc) {
                let f = if v.is_finite() { (v / vmax).clamp(0.0, 1.0) } else { 0.0 };
                // white -> #b40426 (dark red)
                let mix = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
                let _ = write!(
                    svg,
                    r##"<rect x="{:.1}" y="{:.1}" width="{:.2}" height="{:.2}" fill="#{:02x}{:02x}{:02x}"/>"##,
                    x0 + c as f64 * cw,
                    y0 + r as f64 * ch,
                    cw + 0.3,
                    ch + 0.3,
                    mix(255.0, 180.0),
                    mix(255.0, 4.0),
                    mix(255.0, 38.0)
                );
            }
        }
        if p.group > 0 {
            for g in (p.group..nr).step_by(p.group) {
                let y = y0 + g as f64 * ch;
                let _ = write!(svg, r##"<line x1="{x0}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#333" stroke-width="0.8"/>"##, x0 + pw);
            }
        }
        let _ = write!(svg, r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##);
        for c in [0, nc - 1] {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                x0 + (c as f64 + 0.5) * cw,
                y0 + ph + 13.0,
                if p.cols[c].fract() == 0.0 { format!("{}", p.cols[c]) } else { num(p.cols[c]) }
            );
        }
        let _ = write!(svg, r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">{}</text>"##, x0 + pw / 2.0, y0 + ph + 27.0, esc(col_label));
        if i % per_row == 0 {
            let ym = y0 + ph / 2.0;
            let _ = write!(
                svg,
                r#"<text x="{}" y="{ym}" text-anchor="middle" transform="rotate(-90 {} {ym})">{}</text>"#,
                left - 14.0,
                left - 14.0,
                esc(row_label)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}
