//! The contracts pass `buf lint` with the STANDARD rules (`proto/buf.yaml`), and `buf breaking`
//! against the released contracts (`proto/baseline/contracts-v1.binpb`, the image of the contracts
//! as first released): field numbers, names and types never change.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `SIGHTLINE_BUF`, the copy `scripts/test` installs under `.tools/`, or `buf` on PATH.
fn buf() -> PathBuf {
    if let Ok(path) = std::env::var("SIGHTLINE_BUF") {
        return PathBuf::from(path);
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/node_modules/.bin/buf");
    if local.exists() {
        return local;
    }
    PathBuf::from("buf")
}

/// Runs buf in `proto/` and fails the test with its output unless it succeeds.
fn buf_passes(args: &[&str]) {
    let output = Command::new(buf())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| {
            panic!("buf is required (npm install --prefix .tools @bufbuild/buf): {e}")
        });
    assert!(
        output.status.success(),
        "buf {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn protos_pass_buf_lint() {
    buf_passes(&["lint"]);
}

#[test]
fn protos_are_wire_compatible_with_the_released_contracts() {
    buf_passes(&["breaking", "--against", "baseline/contracts-v1.binpb"]);
}

#[test]
fn the_descriptor_set_holds_every_service_of_the_spec() {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(sightline_proto::FILE_DESCRIPTOR_SET).unwrap();
    let methods = |package: &str, service: &str| -> Vec<String> {
        set.file
            .iter()
            .filter(|f| f.package() == package)
            .flat_map(|f| f.service.iter())
            .filter(|s| s.name() == service)
            .flat_map(|s| s.method.iter().map(|m| m.name().to_owned()))
            .collect()
    };
    let expect = |package: &str, service: &str, names: &str| {
        let have = methods(package, service);
        let want: Vec<&str> = names.split(", ").collect();
        assert_eq!(have, want, "{package}.{service}");
    };
    expect(
        "sightline.linker.v1",
        "LinkerService",
        "CreateOrg, ListOrgs, CreateAdminToken, RevokeAdminToken, ListAdminTokens, CreateLinkKey, RegenerateLinkKey, ListLinkKeys, LinkInstance, ListInstances, UnlinkInstance, ValidateCredential, RevokeCredential, ClaimDomain, VerifyDomain, ImportLicenses, DetectInstances",
    );
    expect(
        "sightline.audit.v1",
        "AuditService",
        "AppendEvent, ListEvents, VerifyChain",
    );
    expect(
        "sightline.consent.v1",
        "ConsentService",
        "GetConsent, UpdateConsent, ListConsentHistory, GetReceiptKey, VerifyReceipt, GetPolicy, WatchPolicy, SetInstanceOverride, GetTrackingSettings, UpdateTrackingSettings, GetResidency, RequestResidencyMove, GetRetention, UpdateRetention",
    );
    expect(
        "sightline.collector.v1",
        "CollectorService",
        "Ingest, IngestStream, PreviewSample, GetViewCount, GetPageReport, GetSpaceReport, GetGlobalReport, QueryMetrics, ListStoredEvents, EraseViewer, GetContributedAggregates",
    );
    expect(
        "sightline.insights.v1",
        "InsightsService",
        "GetHealth, GetTrends, GetScoreHistory, RunReadinessAssessment, GetReadiness, UploadAssessment, UploadSupportBundle, GetPortfolio",
    );
}
