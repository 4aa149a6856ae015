//! The dashboard page every diloco peer serves at `/` of its status address: one HTML page,
//! its script and its style sheet, compiled into the binary so it works offline and behind NAT
//! (no CDN, no fonts, nothing fetched from anywhere but the peer itself).
//!
//! The same page serves a training node and a bootstrap peer: it reads `/status` and shows the
//! node view, or the bootstrap view when the status says `"kind": "bootstrap"`. Both servers
//! answer `/status`, `/history` and `/peers` (see docs/DASHBOARD.md for the fields).

/// The page (`GET /`).
pub const PAGE: &str = include_str!("../assets/dashboard.html");
/// Its script (`GET /dashboard.js`).
pub const SCRIPT: &str = include_str!("../assets/dashboard.js");
/// Its style sheet (`GET /dashboard.css`).
pub const STYLE: &str = include_str!("../assets/dashboard.css");

/// The Content-Security-Policy the page is served with: scripts, styles and requests only from
/// the peer itself, no frames, no forms. Even a peer id or agent string crafted as HTML by a
/// remote peer could not load or send anything.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `(path, content type, body)` of every file of the dashboard.
pub const FILES: [(&str, &str, &str); 3] = [
    ("/", "text/html; charset=utf-8", PAGE),
    ("/dashboard.js", "text/javascript; charset=utf-8", SCRIPT),
    ("/dashboard.css", "text/css; charset=utf-8", STYLE),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_files() {
        // Every script and style sheet the page names is one this module serves, and
        // nothing points at another host.
        for (_, _, body) in FILES {
            assert!(!body.contains("http://") || body.contains("http://www.w3.org/2000/svg"));
            assert!(!body.contains("https://"));
            assert!(!body.contains("//cdn"));
        }
        for needed in ["src=\"/dashboard.js\"", "href=\"/dashboard.css\""] {
            assert!(PAGE.contains(needed), "{needed}");
        }
    }

    #[test]
    fn every_element_the_script_addresses_is_on_the_page() {
        let mut missing = Vec::new();
        for part in SCRIPT.split("$('").skip(1) {
            let id = part.split('\'').next().unwrap_or("");
            if !PAGE.contains(&format!("id=\"{id}\"")) {
                missing.push(id.to_string());
            }
        }
        for part in SCRIPT.split("setText('").skip(1) {
            let id = part.split('\'').next().unwrap_or("");
            if !PAGE.contains(&format!("id=\"{id}\"")) {
                missing.push(id.to_string());
            }
        }
        for part in SCRIPT.split("chart('").skip(1) {
            let id = part.split('\'').next().unwrap_or("");
            if !PAGE.contains(&format!("id=\"{id}\"")) {
                missing.push(id.to_string());
            }
        }
        assert!(
            missing.is_empty(),
            "ids the script uses but the page lacks: {missing:?}"
        );
    }

    #[test]
    fn remote_strings_never_become_html() {
        assert!(!SCRIPT.contains("innerHTML"));
        assert!(!SCRIPT.contains("outerHTML"));
        assert!(!SCRIPT.contains("insertAdjacentHTML"));
        assert!(!SCRIPT.contains("document.write"));
    }
}
