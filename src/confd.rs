//! What a confd user brings along, recognised: conf.d's `[template]` table and its `prefix`,
//! `keys`, `check_cmd` and `reload_cmd`, Go templates (`{{range gets ...}}`), and Patroni's raw
//! member fields (`conn_url`). Takes a parser's or Tera's message and the text it was about, and
//! hands back the sentence that says what haconfd wants instead (or nothing). A leaf: imports
//! nothing of haconfd.

/// Where the guide that maps confd's setup onto haconfd's lives.
pub const GUIDE: &str = "docs/MIGRATING-FROM-CONFD.md";

/// Fields of Patroni's member JSON that the context does not carry as such, and what stands
/// for each.
const RAW_MEMBER_FIELDS: &[(&str, &str)] = &[
    ("conn_url", "host, port and address"),
    ("api_url", "api_scheme, api_host and api_port"),
    ("proxy_url", "nothing (not exposed)"),
    ("replication_state", "state"),
    ("receive_lsn", "xlog_location and lag"),
    ("replay_lsn", "xlog_location and lag"),
];

/// confd template-resource keys that a `[[template]]` does not take, and what replaces each.
const RESOURCE_KEYS: &[(&str, &str)] = &[
    (
        "prefix",
        "confd's `prefix` (and -prefix) is `[etcd] namespace` plus `scope`: -prefix=/service/batman \
         is namespace = \"/service\", scope = \"batman\"",
    ),
    (
        "keys",
        "confd's `keys` has no counterpart: haconfd reads every key under \
         `<namespace>/<scope>/`; set `[etcd] namespace` and `scope`",
    ),
    (
        "check_cmd",
        "confd's `check_cmd` (a shell string) is `check = [\"/usr/sbin/haproxy\", \"-c\", \"-f\", \
         \"{{staged}}\"]` (an argv)",
    ),
    (
        "reload_cmd",
        "confd's `reload_cmd` is `reload = { pidfile, signal, process }`, `{ master_socket }` or \
         `{ command = [argv] }`",
    ),
    (
        "uid",
        "confd's `uid`/`gid` are `owner` and `group` (names or numbers)",
    ),
    (
        "gid",
        "confd's `uid`/`gid` are `owner` and `group` (names or numbers)",
    ),
];

/// A hint for a config file that did not parse, from the parser's `message` and the `text`.
pub fn config_hint(message: &str, text: &str) -> Option<String> {
    if message.contains("expected a sequence") {
        for table in ["template", "hook"] {
            let single = format!("[{table}]");
            if text.lines().any(|l| l.trim() == single) {
                return Some(format!(
                    "write `[[{table}]]` (two brackets), not `{single}`: each {table} is one \
                     entry of an array of tables, repeated once per file (confd's conf.d/*.toml \
                     `[template]` becomes one `[[template]]` each); see {GUIDE}"
                ));
            }
        }
    }
    let field = message
        .split("unknown field `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())?;
    RESOURCE_KEYS
        .iter()
        .find(|(key, _)| *key == field)
        .map(|(_, hint)| format!("{hint}; see {GUIDE}"))
}

/// Whether a template's text is written in Go's text/template syntax, as confd's are.
pub fn is_go_template(text: &str) -> bool {
    let compact: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    [
        "{{range ",
        "{{ range ",
        "{{end}}",
        "{{ end }}",
        "{{with ",
        "{{ with ",
        "{{$",
        "{{ $",
        "gets \"",
        "getv \"",
        "{{base ",
        "{{ base ",
        "{{.",
        "{{ .",
    ]
    .iter()
    .any(|p| compact.contains(p))
}

/// A hint for a template that did not compile or render: Go syntax, or a member field the
/// context does not have.
pub fn template_hint(text: &str, report: &str) -> Option<String> {
    if is_go_template(text) {
        return Some(format!(
            "this is confd's Go template syntax (`{{{{range gets ...}}}}`, `{{{{base .Key}}}}`); \
             haconfd templates are Tera (`{{% for m in members %}}`, `{{{{ m.name }}}}`): \
             {GUIDE} translates each confd function, or start from the shipped templates \
             (/usr/share/haconfd/templates)"
        ));
    }
    // Tera lists the fields a member has; what it cannot say is where Patroni's went.
    let (raw, instead) = RAW_MEMBER_FIELDS.iter().find(|(raw, _)| {
        report.contains(&format!("`{raw}`")) || report.contains(&format!(".{raw}"))
    })?;
    Some(format!(
        "Patroni's `{raw}` arrives parsed: a member's {instead} (`haconfd render --context` \
         prints everything a template sees; {GUIDE} maps each confd pipeline)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_bracket_template_table_names_the_double_brackets() {
        let text = "[template]\nsrc = \"t\"\ndest = \"d\"\n";
        let hint = config_hint("invalid type: map, expected a sequence", text).unwrap();
        assert!(hint.contains("`[[template]]`"), "{hint}");
    }

    #[test]
    fn confd_resource_keys_point_at_their_replacement() {
        let hint = config_hint("unknown field `prefix`, expected one of `name`", "").unwrap();
        assert!(
            hint.contains("namespace") && hint.contains("scope"),
            "{hint}"
        );
        let hint = config_hint("unknown field `keys`, expected one of `name`", "").unwrap();
        assert!(hint.contains("namespace"), "{hint}");
        assert_eq!(config_hint("unknown field `srcx`, expected", ""), None);
    }

    #[test]
    fn go_templates_are_recognised_and_tera_ones_are_not() {
        assert!(is_go_template(
            "{{range gets \"/members/*\"}} server {{base .Key}}\n{{end}}"
        ));
        assert!(!is_go_template(
            "{% for m in members %}\n    server {{ m.name }} {{ m.address }}\n{% endfor %}"
        ));
        assert!(!is_go_template(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/templates/haproxy.cfg.tera"
            ))
            .unwrap()
        ));
    }

    #[test]
    fn patronis_raw_member_fields_say_what_stands_for_them() {
        let report = "error: Field `conn_url` is not defined. Available fields: address, host";
        let hint = template_hint("{{ m.conn_url }}", report).unwrap();
        assert!(hint.contains("host, port and address"), "{hint}");
        let report = "error: Field `nmae` is not defined. Available fields: address, name";
        assert_eq!(template_hint("{{ m.nmae }}", report), None);
    }
}
