//! The parts of a Markdown guide that tests run: code blocks after a `<!-- file: NAME -->` line
//! (files to write) and after a `<!-- step -->` line (shell commands, one a line).

use std::collections::BTreeMap;

/// The code blocks of a Markdown file that follow a `<!-- file: NAME -->` line.
pub fn doc_files(md: &str) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let mut lines = md.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- file:")
            .and_then(|s| s.strip_suffix("-->"))
        else {
            continue;
        };
        files.insert(
            name.trim().to_string(),
            block_after(&mut lines, name).join("\n") + "\n",
        );
    }
    files
}

/// The command lines of every code block that follows a `<!-- step -->` line, in order, each
/// block's lines unindented.
pub fn doc_steps(md: &str) -> Vec<Vec<String>> {
    let mut steps = Vec::new();
    let mut lines = md.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "<!-- step -->" {
            continue;
        }
        let mut lines_ = lines.by_ref().skip_while(|l| l.trim().is_empty());
        let mut block = Vec::new();
        if let Some(fence) = lines_.next() {
            assert!(
                fence.trim().starts_with("```"),
                "<!-- step --> not followed by a code block"
            );
            for l in lines_.by_ref() {
                if l.trim().starts_with("```") {
                    break;
                }
                block.push(l.trim().to_string());
            }
        }
        steps.push(block.into_iter().filter(|l| !l.is_empty()).collect());
    }
    steps
}

fn block_after<'a>(lines: &mut impl Iterator<Item = &'a str>, name: &str) -> Vec<&'a str> {
    assert!(
        lines.next().is_some_and(|l| l.starts_with("```")),
        "<!-- file: {name} --> is not followed by a code block"
    );
    lines
        .by_ref()
        .take_while(|l| !l.starts_with("```"))
        .collect()
}
