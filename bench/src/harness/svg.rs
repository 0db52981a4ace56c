//! Minimal horizontal bar charts (median bar, min–max whisker) as standalone SVG.

use std::fmt::Write as _;

use crate::stats::Summary;

/// A chart of `bars` (label, summary); bars without a value are drawn as "failed".
pub fn bars(title: &str, unit: &str, bars: &[(String, Option<Summary>)]) -> String {
    let (w, left, right, row, top) = (640.0, 150.0, 110.0, 28.0, 40.0);
    let h = top + row * bars.len() as f64 + 20.0;
    let max = bars
        .iter()
        .filter_map(|(_, s)| s.map(|s| s.max.max(s.median)))
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let scale = (w - left - right) / max;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(out, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
        esc(&format!("{title} ({unit})"))
    );
    for (i, (label, s)) in bars.iter().enumerate() {
        let y = top + row * i as f64;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 8.0,
            y + 17.0,
            esc(label)
        );
        match s {
            Some(s) => {
                let color = if label.starts_with("meshid") {
                    "#2b6cb0"
                } else {
                    "#a0aec0"
                };
                let bw = (s.median.max(0.0) * scale).max(1.0);
                let _ = writeln!(
                    out,
                    r#"<rect x="{left}" y="{}" width="{bw:.1}" height="20" fill="{color}"/>"#,
                    y + 3.0
                );
                if s.n > 1 {
                    let (x0, x1) = (left + s.min.max(0.0) * scale, left + s.max.max(0.0) * scale);
                    let yc = y + 13.0;
                    let _ = writeln!(
                        out,
                        r#"<path d="M{x0:.1} {yc} H{x1:.1} M{x0:.1} {} V{} M{x1:.1} {} V{}" stroke="black" fill="none"/>"#,
                        yc - 5.0,
                        yc + 5.0,
                        yc - 5.0,
                        yc + 5.0
                    );
                }
                let _ = writeln!(
                    out,
                    r#"<text x="{:.1}" y="{}">{}</text>"#,
                    left + s.max.max(s.median).max(0.0) * scale + 6.0,
                    y + 17.0,
                    esc(&number(s.median))
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    r##"<text x="{left}" y="{}" fill="#c53030">failed</text>"##,
                    y + 17.0
                );
            }
        }
    }
    out.push_str("</svg>\n");
    out
}

/// A number with sensible precision and thousands separators.
pub fn number(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{:.0}", v.abs());
        let mut out = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(ch);
        }
        if v < 0.0 { format!("-{out}") } else { out }
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
