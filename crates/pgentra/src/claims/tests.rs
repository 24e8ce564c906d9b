use super::*;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use serde_json::json;

fn token_with(payload: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(payload.to_string());
    format!("{header}.{body}.c2lnbmF0dXJl")
}

fn role(payload: Value) -> Result<(String, UsernameSource), MissingRole> {
    Claims::decode(&token_with(&payload)).unwrap().role_name()
}

const ISS: &str = "https://sts.windows.net/72f988bf-0000-0000-0000-000000000000/";

#[test]
fn member_user_uses_upn() {
    let claims = json!({"iss": ISS, "upn": "alice@contoso.com", "unique_name": "alice@contoso.com",
        "oid": "o1", "tid": "t1", "idtyp": "user"});
    assert_eq!(
        role(claims.clone()).unwrap(),
        ("alice@contoso.com".into(), UsernameSource::Upn)
    );
    let decoded = Claims::decode(&token_with(&claims)).unwrap();
    assert_eq!(decoded.principal_kind(), PrincipalKind::User);
}

#[test]
fn v2_user_uses_preferred_username_then_unique_name() {
    assert_eq!(
        role(json!({"preferred_username": "bob@contoso.com", "unique_name": "other"})).unwrap(),
        ("bob@contoso.com".into(), UsernameSource::PreferredUsername)
    );
    assert_eq!(
        role(json!({"unique_name": "carol@contoso.com"})).unwrap(),
        ("carol@contoso.com".into(), UsernameSource::UniqueName)
    );
}

#[test]
fn guest_is_detected_and_not_named_by_unique_name() {
    let guest = json!({"iss": ISS, "idp": "live.com", "unique_name": "live.com#bob@outlook.com",
        "oid": "o2", "tid": "t1"});
    let err = role(guest.clone()).unwrap_err();
    assert_eq!(
        err,
        MissingRole::Guest {
            idp: Some("live.com".into())
        }
    );
    assert!(err.to_string().contains("#EXT#"), "{err}");
    let decoded = Claims::decode(&token_with(&guest)).unwrap();
    assert_eq!(decoded.principal_kind(), PrincipalKind::GuestUser);
    // A guest from another Entra tenant: idp is that tenant's issuer, not ours.
    let other_tenant = json!({"iss": ISS, "idp": "https://sts.windows.net/other-tenant/",
        "unique_name": "dave@fabrikam.com", "preferred_username": "dave@fabrikam.com"});
    assert!(matches!(role(other_tenant), Err(MissingRole::Guest { .. })));
}

#[test]
fn idp_equal_to_issuer_is_not_a_guest() {
    let member = json!({"iss": ISS, "idp": ISS, "unique_name": "erin@contoso.com"});
    assert_eq!(role(member).unwrap().0, "erin@contoso.com");
}

#[test]
fn service_principal_has_no_role_claim() {
    let sp = json!({"iss": ISS, "appid": "11111111-2222-3333-4444-555555555555", "oid": "o3",
        "idtyp": "app", "tid": "t1"});
    let err = role(sp.clone()).unwrap_err();
    assert_eq!(
        err,
        MissingRole::AppOnly {
            appid: "11111111-2222-3333-4444-555555555555".into()
        }
    );
    assert_eq!(
        Claims::decode(&token_with(&sp)).unwrap().principal_kind(),
        PrincipalKind::ServicePrincipal
    );
    assert_eq!(
        role(json!({"oid": "o"})).unwrap_err(),
        MissingRole::NoNameClaim
    );
}

#[test]
fn user_assigned_managed_identity_uses_resource_name() {
    let uami = json!({"appid": "a", "idtyp": "app", "xms_mirid":
        "/subscriptions/s1/resourcegroups/rg1/providers/Microsoft.ManagedIdentity/userAssignedIdentities/orders-api-identity"});
    assert_eq!(
        role(uami.clone()).unwrap(),
        (
            "orders-api-identity".into(),
            UsernameSource::UserAssignedIdentity
        )
    );
    assert_eq!(
        Claims::decode(&token_with(&uami)).unwrap().principal_kind(),
        PrincipalKind::UserAssignedManagedIdentity
    );
}

#[test]
fn system_assigned_identity_of_a_vm_uses_vm_name() {
    let vm = json!({"appid": "a", "xms_mirid":
        "/subscriptions/s1/resourceGroups/rg1/providers/Microsoft.Compute/virtualMachines/build-agent-7"});
    assert_eq!(
        role(vm).unwrap(),
        (
            "build-agent-7".into(),
            UsernameSource::SystemAssignedIdentity
        )
    );
}

#[test]
fn system_assigned_identity_of_an_app_service_slot_uses_app_slots_slot() {
    let slot = json!({"appid": "a", "xms_mirid":
        "/subscriptions/s1/resourcegroups/rg1/providers/Microsoft.Web/sites/shop/slots/staging"});
    assert_eq!(
        role(slot).unwrap(),
        (
            "shop/slots/staging".into(),
            UsernameSource::SystemAssignedIdentity
        )
    );
}

#[test]
fn claim_precedence_when_claims_conflict() {
    let all = json!({"xms_mirid":
        "/subscriptions/s/resourcegroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/mi",
        "upn": "u@x", "preferred_username": "p@x", "unique_name": "n@x"});
    assert_eq!(role(all).unwrap().0, "mi");
    assert_eq!(
        role(json!({"upn": "u@x", "preferred_username": "p@x", "unique_name": "n@x"}))
            .unwrap()
            .0,
        "u@x"
    );
    // An empty upn does not hide the next claim.
    assert_eq!(
        role(json!({"upn": "", "preferred_username": "p@x"}))
            .unwrap()
            .0,
        "p@x"
    );
}

#[test]
fn malformed_mirid_falls_through_to_other_claims() {
    let bad = json!({"xms_mirid": "/subscriptions/s/providers/OnlyNamespace", "upn": "u@x"});
    assert_eq!(role(bad).unwrap().0, "u@x");
}

#[test]
fn padded_base64_is_accepted() {
    let body = URL_SAFE.encode(json!({"upn": "a@b"}).to_string());
    assert!(body.ends_with('='), "test needs a padded payload: {body}");
    let claims = Claims::decode(&format!("e30.{body}.sig")).unwrap();
    assert_eq!(claims.str("upn"), Some("a@b"));
}

#[test]
fn audiences_accept_string_or_array() {
    let one = Claims::decode(&token_with(&json!({"aud": "https://x"}))).unwrap();
    assert_eq!(one.audiences(), vec!["https://x"]);
    let many = Claims::decode(&token_with(&json!({"aud": ["a", "b"]}))).unwrap();
    assert_eq!(many.audiences(), vec!["a", "b"]);
}

#[test]
fn malformed_tokens_give_typed_errors() {
    let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
    let non_utf8 = URL_SAFE_NO_PAD.encode([0xff, 0xfe, 0x7b]);
    let cases: Vec<(String, TokenFormatError)> = vec![
        ("".into(), TokenFormatError::Empty),
        ("   ".into(), TokenFormatError::Empty),
        (
            "justonesegment".into(),
            TokenFormatError::SegmentCount { found: 1 },
        ),
        ("a.b".into(), TokenFormatError::SegmentCount { found: 2 }),
        (
            "a.b.c.d.e".into(),
            TokenFormatError::SegmentCount { found: 5 },
        ),
        ("e30.***.sig".into(), TokenFormatError::Base64),
        ("e30.a.sig".into(), TokenFormatError::Base64),
        (format!("e30.{non_utf8}.sig"), TokenFormatError::NotUtf8),
        (
            format!("e30.{}.sig", b64("{\"upn\":")),
            TokenFormatError::Json {
                message: "Eof error at line 1 column 7".into(),
            },
        ),
        (
            format!("e30.{}.sig", b64("[1,2]")),
            TokenFormatError::NotAnObject,
        ),
        (
            format!("e30.{}.sig", b64("\"text\"")),
            TokenFormatError::NotAnObject,
        ),
        (
            format!("e30.{}.sig", b64(r#"{"upn":42}"#)),
            TokenFormatError::ClaimType {
                claim: "upn",
                expected: "a string",
            },
        ),
        (
            format!("e30.{}.sig", b64(r#"{"xms_mirid":["x"]}"#)),
            TokenFormatError::ClaimType {
                claim: "xms_mirid",
                expected: "a string",
            },
        ),
        (
            format!("e30.{}.sig", b64(r#"{"exp":"soon"}"#)),
            TokenFormatError::ClaimType {
                claim: "exp",
                expected: "an integer (seconds since the Unix epoch)",
            },
        ),
        (
            format!("e30.{}.sig", b64(r#"{"aud":7}"#)),
            TokenFormatError::ClaimType {
                claim: "aud",
                expected: "a string or an array of strings",
            },
        ),
    ];
    for (token, expected) in cases {
        assert_eq!(
            Claims::decode(&token).unwrap_err(),
            expected,
            "token {token:?}"
        );
    }
}

#[test]
fn error_text_never_contains_the_payload() {
    let secretish = "SECRETPAYLOADTEXT";
    let token = format!(
        "e30.{}.sig",
        URL_SAFE_NO_PAD.encode(format!("{{\"upn\": {secretish}}}"))
    );
    let err = Claims::decode(&token).unwrap_err();
    assert!(!err.to_string().contains(secretish), "{err}");
    assert!(!format!("{err:?}").contains(secretish), "{err:?}");
}
