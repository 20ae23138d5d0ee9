//! `include = ["conf.d/*.toml"]`: entries of a role's [`RoleConfig::INCLUDE_SECTIONS`] (the monitor's
//! `[programs.*]`) kept in files of their own, as Supervisord's `[include] files = conf.d/*.conf`: a package
//! or a deploy drops one file per program. Patterns are relative to the including file's directory and may
//! hold `*` and `?` in the file name only; matches are taken in name order, and a pattern matching nothing
//! is no error (an empty `conf.d`), while a plain file name that does not exist is. Included files may hold
//! only those sections, and an entry defined twice (in two files, or in one and the main file) is an error
//! naming both, never a silent override. Bounded: at most [`MAX_INCLUDED_FILES`] files, each read as the main
//! file is.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{ConfigError, ConfigIssue, Sources, parse_table, read_bounded};

/// Most files one config may include (all patterns together).
pub const MAX_INCLUDED_FILES: usize = 256;

/// Merges into `table` the files its `include` key names (removing the key), for `sections`; `base` is the
/// including file (`None`: bytes with no file, which may include nothing). Problems go to `issues`; the
/// patterns and every file read go to `sources`, so the reloader can watch them and tell an edit from a touch.
/// Returns where each included entry came from (`programs.web`, the file), so that a later issue with it
/// names the file to fix rather than the main file, which does not hold it.
pub fn apply(
    table: &mut toml::Table,
    base: Option<&Path>,
    sections: &[&str],
    issues: &mut Vec<ConfigIssue>,
    sources: &mut Sources,
) -> Vec<(String, String)> {
    let mut origins = Vec::new();
    let Some(value) = table.remove("include") else {
        return origins;
    };
    let patterns: Vec<&str> = match &value {
        toml::Value::String(s) => vec![s.as_str()],
        toml::Value::Array(items) if items.iter().all(toml::Value::is_str) => {
            items.iter().filter_map(toml::Value::as_str).collect()
        }
        _ => {
            issues.push(included(format!(
                "expected a list of file patterns, found {}",
                super::quoted(&value)
            )));
            return origins;
        }
    };
    let Some(dir) = base.and_then(Path::parent) else {
        issues.push(included("only a config file can include others".into()));
        return origins;
    };
    let mut files = Vec::new();
    // A file two patterns match is read once, not taken for a second definition of its programs; the
    // including file, which a pattern of its own directory (`*.toml`) matches, is read already.
    let mut seen = std::collections::HashSet::from([base.map(Path::to_path_buf)]);
    for text in patterns {
        let pattern = match IncludePattern::parse(dir, text) {
            Ok(p) => p,
            Err(why) => {
                issues.push(included(format!("{text:?}: {why}")));
                continue;
            }
        };
        let found = expand(&pattern);
        sources.pattern(&pattern, found.as_deref().map_err(String::as_str));
        match found {
            Ok(found) => files.extend(found.into_iter().filter(|f| seen.insert(Some(f.clone())))),
            Err(why) => issues.push(included(format!("{text:?}: {why}"))),
        }
    }
    if files.len() > MAX_INCLUDED_FILES {
        issues.push(included(format!(
            "{} files; at most {MAX_INCLUDED_FILES} may be included",
            files.len()
        )));
        return origins;
    }
    // Where each entry was defined first, to name both places of a duplicate.
    let mut defined: HashMap<(String, String), String> = HashMap::new();
    for section in sections {
        if let Some(toml::Value::Table(entries)) = table.get(*section) {
            for name in entries.keys() {
                defined.insert((section.to_string(), name.clone()), "the main file".into());
            }
        }
    }
    for file in files {
        let shown = file.display().to_string();
        let read = read_bounded(&file);
        sources.file(&file, read.as_deref().ok());
        let entries_of = match read.and_then(|bytes| parse_table(&bytes, &shown)) {
            Ok(t) => t,
            Err(ConfigError::Syntax { message, .. }) => {
                issues.push(included(format!("{shown}: {message}")));
                continue;
            }
            Err(e) => {
                issues.push(included(e.to_string()));
                continue;
            }
        };
        for (key, value) in entries_of {
            let toml::Value::Table(entries) = value else {
                issues.push(included(format!(
                    "{shown}: {key} is not a section; an included file holds only {}",
                    list(sections)
                )));
                continue;
            };
            if !sections.contains(&key.as_str()) {
                issues.push(included(format!(
                    "{shown}: [{key}] cannot be included; an included file holds only {}",
                    list(sections)
                )));
                continue;
            }
            let into = table
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(into) = into.as_table_mut() else {
                // The main file's `key` is no table: its own issue says so when it is deserialised.
                continue;
            };
            for (name, entry) in entries {
                let place = (key.clone(), name.clone());
                if let Some(first) = defined.get(&place) {
                    let message = format!("defined in {shown} and in {first}");
                    issues.push(ConfigIssue::new(format!("{key}.{name}"), message));
                    continue;
                }
                defined.insert(place, shown.clone());
                origins.push((format!("{key}.{name}"), shown.clone()));
                into.insert(name, entry);
            }
        }
    }
    origins
}

/// An issue of the `include` key itself.
fn included(message: String) -> ConfigIssue {
    ConfigIssue::new("include", message)
}

fn list(sections: &[&str]) -> String {
    let shown: Vec<String> = sections.iter().map(|s| format!("[{s}.*]")).collect();
    shown.join(", ")
}

/// One pattern of `include`, split as [`expand`] and the reload watcher need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncludePattern {
    /// The directory it names files in: the including file's, joined with the pattern's own directories.
    pub dir: PathBuf,
    /// The file-name part, which alone may hold `*` and `?`.
    pub name: String,
}

impl IncludePattern {
    /// `text` relative to `dir` (the including file's directory).
    fn parse(dir: &Path, text: &str) -> Result<Self, String> {
        let path = dir.join(text);
        let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
            return Err("not a file pattern".into());
        };
        if wild(&parent.to_string_lossy()) {
            return Err("wildcards only in the file name (conf.d/*.toml)".into());
        }
        Ok(Self {
            dir: parent.to_path_buf(),
            name: name.to_string(),
        })
    }

    /// Whether `path` is a file this pattern names, or would name once it exists: in its directory, with a
    /// file name it matches as [`expand`] does (so the watcher and the load agree on what is included).
    pub fn names(&self, path: &Path) -> bool {
        path.parent() == Some(self.dir.as_path())
            && (path.file_name().and_then(|n| n.to_str())).is_some_and(|n| matches(&self.name, n))
    }
}

fn wild(s: &str) -> bool {
    s.contains(['*', '?'])
}

/// The files `pattern` names: itself without wildcards, else the matches in name order.
fn expand(pattern: &IncludePattern) -> Result<Vec<PathBuf>, String> {
    if !wild(&pattern.name) {
        return Ok(vec![pattern.dir.join(&pattern.name)]);
    }
    let read = std::fs::read_dir(&pattern.dir).map_err(|e| format!("{}: {e}", pattern.dir.display()))?;
    let mut found: Vec<PathBuf> = read
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
        .filter(|e| e.file_name().to_str().is_some_and(|n| matches(&pattern.name, n)))
        .map(|e| e.path())
        .collect();
    found.sort();
    Ok(found)
}

/// Whether `name` matches `pattern`, where `*` is any run of characters and `?` any one. A leading `.` is
/// matched only by a pattern's leading `.`, as a shell's glob does, so an editor's `.web.toml.swp` is not
/// taken for a program.
fn matches(pattern: &str, name: &str) -> bool {
    if name.starts_with('.') && !pattern.starts_with('.') {
        return false;
    }
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matching with one backtrack point (the last `*`): linear in practice, no recursion.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        match p.get(i) {
            Some('*') => {
                star = Some((i, j));
                i += 1;
            }
            Some('?') => {
                i += 1;
                j += 1;
            }
            Some(c) if *c == n[j] => {
                i += 1;
                j += 1;
            }
            _ => match star {
                Some((si, sj)) => {
                    i = si + 1;
                    j = sj + 1;
                    star = Some((si, sj + 1));
                }
                None => return false,
            },
        }
    }
    p[i..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(main: &str, files: &[(&str, &str)], include: &str) -> (toml::Table, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let main_path = dir.path().join("main.toml");
        let mut table: toml::Table = format!("include = {include}\n{main}").parse().unwrap();
        let mut issues = Vec::new();
        apply(
            &mut table,
            Some(&main_path),
            &["programs"],
            &mut issues,
            &mut Sources::new(b""),
        );
        let root = dir.path().display().to_string();
        let shown = issues
            .iter()
            .map(|i| format!("{}: {}", i.key, i.message).replace(&root, "D"))
            .collect();
        (table, shown)
    }

    fn names(t: &toml::Table) -> Vec<&str> {
        t["programs"]
            .as_table()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect()
    }

    #[test]
    fn included_programs_join_the_main_files() {
        let (t, issues) = merged(
            "[programs.main]\ncommand = \"a\"\n",
            &[
                ("conf.d/web.toml", "[programs.web]\ncommand = \"w\"\n"),
                (
                    "conf.d/db.toml",
                    "[programs.db]\ncommand = \"d\"\n[programs.cache]\ncommand = \"c\"\n",
                ),
                ("conf.d/notes.txt", "not toml at all ["),
                ("conf.d/.web.toml.swp", "not toml at all ["),
            ],
            r#"["conf.d/*.toml"]"#,
        );
        assert_eq!(issues, Vec::<String>::new());
        assert_eq!(names(&t), ["cache", "db", "main", "web"]);
        assert!(!t.contains_key("include"));
        // A file several patterns match counts once.
        let (t, issues) = merged(
            "",
            &[("conf.d/web.toml", "[programs.web]\n")],
            r#"["conf.d/*.toml", "conf.d/web.toml"]"#,
        );
        assert_eq!((names(&t), issues), (vec!["web"], vec![]));
        // An empty directory is no error; a single pattern may be a plain string.
        let (t, issues) = merged("[programs.main]\n", &[], r#""conf.d/*.toml""#);
        assert_eq!((names(&t), issues), (vec!["main"], vec![]));
    }

    #[test]
    fn every_problem_of_an_include_is_named() {
        let (_, issues) = merged("", &[], r#"["a.toml", 7]"#);
        assert_eq!(
            issues,
            ["include: expected a list of file patterns, found [\"a.toml\", 7]"]
        );
        let (_, issues) = merged(
            "[programs.web]\ncommand = \"a\"\n",
            &[
                ("conf.d/a.toml", "[programs.web]\ncommand = \"w\"\n[programs.x]\n"),
                ("conf.d/b.toml", "listen = \"x\"\n[programs.x]\n[http]\nmax = 1\n"),
                ("conf.d/c.toml", "[programs.y\n"),
            ],
            r#"["conf.d/*.toml", "missing.toml", "con*/x.toml"]"#,
        );
        let expected = [
            "include: \"con*/x.toml\": wildcards only in the file name (conf.d/*.toml)",
            "programs.web: defined in D/conf.d/a.toml and in the main file",
            "include: D/conf.d/b.toml: listen is not a section; an included file holds only [programs.*]",
            "include: D/conf.d/b.toml: [http] cannot be included; an included file holds only [programs.*]",
            "programs.x: defined in D/conf.d/b.toml and in D/conf.d/a.toml",
        ];
        for e in expected {
            assert!(issues.iter().any(|i| i == e), "{e:?} in {issues:#?}");
        }
        assert!(
            issues.iter().any(|i| i.starts_with("include: D/conf.d/c.toml: ")),
            "{issues:#?}"
        );
        assert!(issues.iter().any(|i| i.contains("D/missing.toml")), "{issues:#?}");
        assert_eq!(issues.len(), 7, "{issues:#?}");
    }

    #[test]
    fn bytes_without_a_file_include_nothing() {
        let mut table: toml::Table = "include = [\"x/*.toml\"]".parse().unwrap();
        let mut issues = Vec::new();
        apply(
            &mut table,
            None,
            &["programs"],
            &mut issues,
            &mut Sources::new(b""),
        );
        assert_eq!(issues[0].message, "only a config file can include others");
    }

    /// `*.toml` beside the main file matches the main file too: it is not read again as an included file
    /// (which named each of its settings "not a section" and its programs defined twice).
    #[test]
    fn a_pattern_matching_the_including_file_leaves_it_out() {
        let main = "[programs.a]\ncommand = \"a\"\n";
        let files = [("main.toml", main), ("web.toml", "[programs.web]\n")];
        let (table, issues) = merged(main, &files, r#"["*.toml", "./main.toml"]"#);
        assert_eq!(issues, Vec::<String>::new());
        let programs: Vec<&String> = table["programs"].as_table().unwrap().keys().collect();
        assert_eq!(programs, ["a", "web"]);
    }

    #[test]
    fn wildcards_match_as_a_shell_does() {
        for (p, n, want) in [
            ("*.toml", "web.toml", true),
            ("*.toml", "web.toml.bak", false),
            ("w?b.toml", "web.toml", true),
            ("*", "a", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("*.toml", ".hidden.toml", false),
            (".*.toml", ".hidden.toml", true),
            ("**", "", true),
        ] {
            assert_eq!(matches(p, n), want, "{p} ~ {n}");
        }
    }
}
