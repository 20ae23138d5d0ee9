//! Which programs a command's names pick, for the supervisor and for `xcluster ctl` alike: a program's name,
//! `group:name`, `group:*`, a bare group name, or `all`. A group is a `[programs.*]` section (its `numprocs`
//! instances) or a `[groups.*]` one (the instances of the programs it names).

use std::collections::BTreeMap;

/// `[groups.*]`: each named group's programs (`[programs.*]` names).
pub type Groups = BTreeMap<String, Vec<String>>;

/// The programs `names` pick among `programs` (each a name and its `[programs.*]` section, in start order),
/// with `groups` naming further groups of sections: indexes into `programs`, each once, in the order the
/// names pick them, and whether the program was named on its own (by its name, or `group:name`) rather than
/// picked by a pattern (`all`, a group). `Err` is the first name that picks nothing.
pub fn resolve<'n>(
    programs: &[(&str, &str)],
    groups: &Groups,
    names: &'n [String],
) -> Result<Vec<(usize, bool)>, &'n str> {
    let within = |section: &str, group: &str| {
        section == group || groups.get(group).is_some_and(|g| g.iter().any(|p| p == section))
    };
    let mut out: Vec<(usize, bool)> = Vec::new();
    for n in names {
        let in_group = |group: &str| -> Vec<usize> {
            (programs.iter().enumerate())
                .filter(|(_, (_, g))| within(g, group))
                .map(|(i, _)| i)
                .collect()
        };
        let named = |name: &str, group: Option<&str>| -> Vec<usize> {
            (programs
                .iter()
                .position(|(p, g)| *p == name && group.is_none_or(|group| within(g, group))))
            .into_iter()
            .collect()
        };
        let (found, alone) = if n == "all" {
            ((0..programs.len()).collect(), false)
        } else if let Some(group) = n.strip_suffix(":*") {
            (in_group(group), false)
        } else if let Some((group, name)) = n.split_once(':') {
            (named(name, Some(group)), true)
        } else {
            match named(n, None) {
                one if !one.is_empty() => (one, true),
                _ => (in_group(n), false),
            }
        };
        if found.is_empty() {
            return Err(n);
        }
        for f in found {
            match out.iter_mut().find(|(i, _)| *i == f) {
                Some(seen) => seen.1 |= alone,
                None => out.push((f, alone)),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PROGRAMS: &[(&str, &str)] = &[("db", "db"), ("app-0", "app"), ("app-1", "app"), ("web", "web")];

    fn pick(names: &[&str]) -> Result<Vec<(usize, bool)>, String> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let groups = Groups::from([("site".to_string(), vec!["web".to_string(), "app".to_string()])]);
        resolve(PROGRAMS, &groups, &names).map_err(str::to_string)
    }

    #[test]
    fn names_groups_and_all() {
        assert_eq!(
            pick(&["all"]),
            Ok(vec![(0, false), (1, false), (2, false), (3, false)])
        );
        assert_eq!(pick(&["app:*"]), Ok(vec![(1, false), (2, false)]));
        assert_eq!(pick(&["app"]), Ok(vec![(1, false), (2, false)]));
        assert_eq!(pick(&["app:app-1"]), Ok(vec![(2, true)]));
        assert_eq!(pick(&["web", "db"]), Ok(vec![(3, true), (0, true)]));
        // Each program once; named on its own by any of the names that pick it.
        assert_eq!(pick(&["app", "app-1"]), Ok(vec![(1, false), (2, true)]));
    }

    #[test]
    fn a_named_group_picks_its_programs_instances_in_start_order() {
        assert_eq!(pick(&["site:*"]), Ok(vec![(1, false), (2, false), (3, false)]));
        assert_eq!(pick(&["site"]), Ok(vec![(1, false), (2, false), (3, false)]));
        assert_eq!(pick(&["site:web"]), Ok(vec![(3, true)]));
        assert_eq!(pick(&["site:app-0", "db"]), Ok(vec![(1, true), (0, true)]));
        // Its programs keep their own names and sections.
        assert_eq!(
            pick(&["app:*", "web"]),
            Ok(vec![(1, false), (2, false), (3, true)])
        );
        assert_eq!(pick(&["site:db"]), Err("site:db".into()));
    }

    #[test]
    fn a_name_that_picks_nothing_is_the_error() {
        assert_eq!(pick(&["db", "nope"]), Err("nope".into()));
        assert_eq!(pick(&["web:app-0"]), Err("web:app-0".into()));
        assert_eq!(pick(&["cache:*"]), Err("cache:*".into()));
    }
}
