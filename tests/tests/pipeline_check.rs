//! `nightshift check SPEC --sample DIR` as CI runs it: a pipeline whose samples hold, one
//! whose sample drifted from its contract, one that breaks a business rule; text, JSON and a
//! JUnit file that a JUnit reader (Python's XML parser, here) accepts.

use nightshift_tests::Sandbox;
use serde_json::Value;

const SPEC: &str = r#"[pipeline]
name = "orders_daily"

[[source]]
name = "orders"
format = "csv"
location = "/production/landing/orders/"
[source.schema]
id = "bigint not null"
amount = "decimal(10, 2)"

[transform]
sql = "SELECT id, amount FROM orders"

[target]
table = "analytics.orders"

[[check]]
name = "amount_not_negative"
type = "range"
columns = ["amount"]
min = 0

[[check]]
name = "some_orders"
type = "row_count"
min = 1
severity = "warn"
"#;

fn check(sandbox: &Sandbox, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = sandbox.cli(&[&["check", "pipeline.toml", "--sample", "samples"], extra].concat());
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Parses a JUnit file and returns (tests, failures, names of failed cases).
fn junit(path: &std::path::Path) -> (u64, u64, Vec<String>) {
    let script = format!(
        "import json, sys, xml.etree.ElementTree as ET\n\
         root = ET.parse('{}').getroot()\n\
         suite = root.find('testsuite')\n\
         failed = [c.get('name') for c in suite.findall('testcase') if c.find('failure') is not None]\n\
         json.dump([int(suite.get('tests')), int(suite.get('failures')), failed], sys.stdout)\n",
        path.display()
    );
    let out = std::process::Command::new(nightshift_tests::python())
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn samples_that_hold_pass_drift_and_broken_rules_fail() {
    let sandbox = Sandbox::new();
    sandbox.spec(SPEC);
    sandbox.write("samples/orders.csv", "id,amount\n1,10.50\n2,0.00\n");
    let (code, stdout, stderr) = check(&sandbox, &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("ok   check amount_not_negative"),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("5 cases, 0 failed, 0 warned\n"),
        "{stdout}"
    );
    // Nothing was written where the spec publishes: the check uses a throw-away warehouse.
    assert!(!sandbox.path("warehouse").exists());

    // A business rule broken by the sample: exit 1, the rule and the row named.
    sandbox.write("samples/orders.csv", "id,amount\n1,10.50\n2,-3.25\n");
    let junit_file = sandbox.path("junit.xml");
    let (code, stdout, _) = check(
        &sandbox,
        &["--junit", junit_file.to_str().unwrap(), "--output", "json"],
    );
    assert_eq!(code, Some(1), "{stdout}");
    let cases: Value = serde_json::from_str(stdout.trim()).unwrap();
    let rule = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "check amount_not_negative")
        .unwrap();
    assert_eq!(rule["passed"], false, "{cases:#}");
    assert!(
        rule["message"].as_str().unwrap().contains("-3.25"),
        "{rule}"
    );
    assert_eq!(
        junit(&junit_file),
        (5, 1, vec!["check amount_not_negative".to_string()])
    );

    // Schema drift: the sample's `id` is no longer a number.
    sandbox.write("samples/orders.csv", "id,amount\nA-1,10.50\n");
    let (code, stdout, _) = check(&sandbox, &["--junit", junit_file.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("FAIL source orders"), "{stdout}");
    assert!(stdout.contains("id"), "{stdout}");
    let (_, failures, failed) = junit(&junit_file);
    assert_eq!((failures, failed), (1, vec!["source orders".to_string()]));

    // A source without a sample is named with where its sample should be.
    std::fs::remove_file(sandbox.path("samples/orders.csv")).unwrap();
    let (code, stdout, _) = check(&sandbox, &[]);
    assert_eq!(code, Some(1));
    assert!(stdout.contains("samples/orders.csv"), "{stdout}");
}

#[test]
fn set_checks_run_on_samples_and_a_relationship_is_reported_not_run() {
    let sandbox = Sandbox::new();
    let extra = "\n[[check]]\nname = \"one_row_per_id\"\ntype = \"unique\"\ncolumns = [\"id\"]\n\n\
                 [[check]]\nname = \"known_customer\"\ntype = \"relationship\"\ncolumns = [\"id\"]\n\
                 to = \"crm.customers\"\n";
    sandbox.spec(&format!("{SPEC}{extra}"));
    sandbox.write("samples/orders.csv", "id,amount\n1,10.50\n2,0.00\n");
    let (code, stdout, stderr) = check(&sandbox, &[]);
    // The relationship's table has no sample: reported, not failed.
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("ok   check one_row_per_id"), "{stdout}");
    assert!(
        stdout.contains("check known_customer") && stdout.contains("not run"),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("7 cases, 0 failed, 1 warned\n"),
        "{stdout}"
    );
    // A duplicated id in the sample fails the unique check.
    sandbox.write("samples/orders.csv", "id,amount\n1,10.50\n1,0.00\n");
    let (code, stdout, _) = check(&sandbox, &[]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("FAIL check one_row_per_id"), "{stdout}");
}
