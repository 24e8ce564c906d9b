//! Azure's Entra provisioning, in SQL: the `azure_pg_admin` role, the functions an Entra
//! administrator creates roles with (`pgaadauth_create_principal`,
//! `pgaadauth_create_principal_with_oid`, `pgaadauth_list_principals`) in the `postgres`
//! database with Azure's signatures, results and error texts, and the record of which role is
//! which principal, which the gateway reads at every login.
//!
//! Azure records the mapping as a security label (`aadauth,oid=<oid>,type=<type>,admin`),
//! which needs a label provider compiled into the server. The emulator keeps the same facts in
//! `pgaadauth.principals`, keyed by the role's OID: `DROP ROLE` ends the mapping at once (the
//! row no longer joins `pg_roles`), and a role created again under the same name is a new role
//! with no mapping, as on Azure.

use crate::directory::Directory;

/// `text` as a quoted SQL string literal (the server has `standard_conforming_strings` on).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// What an Entra administrator's functions and the gateway need, idempotent so an external
/// backend may already have it. `directory` fills `pgaadauth.directory`, which stands in for
/// the Microsoft Graph lookups Azure makes.
pub(crate) fn setup(directory: &Directory, tenant: &str) -> String {
    let objects: Vec<String> = directory
        .objects()
        .iter()
        .map(|o| {
            format!(
                "({}, {}, {})",
                literal(&o.name),
                literal(&o.oid),
                literal(o.object_type)
            )
        })
        .collect();
    let rows = if objects.is_empty() {
        String::new()
    } else {
        format!(
            "INSERT INTO pgaadauth.directory VALUES {};",
            objects.join(", ")
        )
    };
    let tenant = literal(tenant);
    format!(
        r#"
\connect postgres
-- Emulators that share a backend set it up one at a time (DDL of the same objects races).
SELECT pg_advisory_lock(hashtext('pgentra emulator setup'));
DO $$ BEGIN CREATE ROLE azure_pg_admin NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
-- As on Azure, public is owned by azure_pg_admin, so an Entra administrator creates tables there
-- and other principals (PostgreSQL 15+) do not.
ALTER SCHEMA public OWNER TO azure_pg_admin;
CREATE SCHEMA IF NOT EXISTS pgaadauth;
REVOKE ALL ON SCHEMA pgaadauth FROM PUBLIC;
CREATE TABLE IF NOT EXISTS pgaadauth.directory (
    name text NOT NULL,
    object_id text NOT NULL,
    object_type text NOT NULL CHECK (object_type IN ('user', 'group', 'service'))
);
CREATE TABLE IF NOT EXISTS pgaadauth.principals (
    role_oid oid PRIMARY KEY,
    object_id text NOT NULL,
    object_type text NOT NULL,
    is_admin boolean NOT NULL,
    is_mfa boolean NOT NULL
);
CREATE TABLE IF NOT EXISTS pgaadauth.settings (tenant_id text NOT NULL);
TRUNCATE pgaadauth.directory, pgaadauth.settings;
{rows}
INSERT INTO pgaadauth.settings VALUES ({tenant});

CREATE OR REPLACE FUNCTION pgaadauth.create_role(
    role_name text, object_id text, object_type text, is_admin boolean, is_mfa boolean)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
    EXECUTE format('CREATE ROLE %I LOGIN', role_name);
    IF is_admin THEN
        EXECUTE format('GRANT azure_pg_admin TO %I', role_name);
        EXECUTE format('ALTER ROLE %I CREATEROLE CREATEDB', role_name);
    END IF;
    DELETE FROM pgaadauth.principals p WHERE NOT EXISTS (SELECT FROM pg_roles r WHERE r.oid = p.role_oid);
    INSERT INTO pgaadauth.principals
        SELECT r.oid, object_id, object_type, is_admin, is_mfa FROM pg_roles r WHERE r.rolname = role_name;
    RETURN format('Created role for "%s"', role_name);
END $f$;
REVOKE ALL ON FUNCTION pgaadauth.create_role(text, text, text, boolean, boolean) FROM PUBLIC;

-- Azure's functions live in pg_catalog of the postgres database: called from another
-- database they do not exist ("No function matches the given name and argument types").
SET allow_system_table_mods = on;

CREATE OR REPLACE FUNCTION pg_catalog.pgaadauth_create_principal(
    roleName text, isAdmin boolean, isMfa boolean)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
    found integer;
    entry record;
BEGIN
    SELECT count(*) INTO found FROM pgaadauth.directory WHERE name = roleName;
    IF found = 0 THEN
        RAISE EXCEPTION 'Could not validate AAD user "%" because its name is not found in the tenant. Make sure it''s correct and retry.', roleName
            USING ERRCODE = '0LP01';
    ELSIF found > 1 THEN
        RAISE EXCEPTION 'Cannot validate Microsoft Entra ID user "%" because its name isn''t unique in the tenant.', roleName
            USING ERRCODE = '0LP01', DETAIL = 'Make sure it''s correct and retry.';
    END IF;
    SELECT * INTO entry FROM pgaadauth.directory WHERE name = roleName;
    RETURN pgaadauth.create_role(roleName, entry.object_id, entry.object_type, isAdmin, isMfa);
END $f$;

CREATE OR REPLACE FUNCTION pg_catalog.pgaadauth_create_principal_with_oid(
    roleName text, objectId text, objectType text, isAdmin boolean, isMfa boolean)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
    entry record;
BEGIN
    IF objectType IS NULL OR objectType NOT IN ('user', 'group', 'service') THEN
        RAISE EXCEPTION 'incorrect object type provided for principal, given object type: ''%''', objectType
            USING ERRCODE = 'XX000', HINT = 'The object type is user, group or service.';
    END IF;
    SELECT * INTO entry FROM pgaadauth.directory WHERE object_id = objectId;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Could not validate AAD user % because its name is not found in the tenant. Make sure it''s correct and retry.', objectId
            USING ERRCODE = '0LP01';
    ELSIF entry.object_type <> objectType THEN
        RAISE EXCEPTION 'incorrect object type provided for principal, given object type: ''%'', actual object type: ''%''', objectType, entry.object_type
            USING ERRCODE = 'XX000';
    END IF;
    RETURN pgaadauth.create_role(roleName, objectId, objectType, isAdmin, isMfa);
END $f$;

CREATE OR REPLACE FUNCTION pg_catalog.pgaadauth_list_principals(isAdminValue boolean)
RETURNS TABLE(rolname name, principalType text, objectId text, tenantId text, isMfa integer, isAdmin integer)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
    SELECT r.rolname, p.object_type, p.object_id, (SELECT tenant_id FROM pgaadauth.settings LIMIT 1),
           p.is_mfa::integer, p.is_admin::integer
    FROM pgaadauth.principals p JOIN pg_roles r ON r.oid = p.role_oid
    WHERE p.is_admin OR NOT isAdminValue
    ORDER BY r.rolname
$f$;

RESET allow_system_table_mods;
-- Only an Entra administrator may call them: others get "permission denied for function".
REVOKE ALL ON FUNCTION pg_catalog.pgaadauth_create_principal(text, boolean, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_catalog.pgaadauth_create_principal_with_oid(text, text, text, boolean, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_catalog.pgaadauth_list_principals(boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pg_catalog.pgaadauth_create_principal(text, boolean, boolean) TO azure_pg_admin;
GRANT EXECUTE ON FUNCTION pg_catalog.pgaadauth_create_principal_with_oid(text, text, text, boolean, boolean) TO azure_pg_admin;
GRANT EXECUTE ON FUNCTION pg_catalog.pgaadauth_list_principals(boolean) TO azure_pg_admin;
"#
    )
}

/// Creates the role of a directory object at start, as an administrator would. Idempotent: a
/// role an external backend already has is mapped (and made an administrator) in place.
pub(crate) fn role(name: &str, oid: &str, object_type: &str, admin: bool) -> String {
    let (name, oid, object_type) = (literal(name), literal(oid), literal(object_type));
    format!(
        "DO $$ BEGIN\n\
         IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {name}) THEN\n\
             PERFORM pgaadauth.create_role({name}, {oid}, {object_type}, {admin}, false);\n\
         ELSE\n\
             INSERT INTO pgaadauth.principals SELECT oid, {oid}, {object_type}, {admin}, false\n\
                 FROM pg_roles WHERE rolname = {name}\n\
                 ON CONFLICT (role_oid) DO UPDATE SET object_id = EXCLUDED.object_id,\n\
                     object_type = EXCLUDED.object_type, is_admin = EXCLUDED.is_admin;\n\
             IF {admin} THEN\n\
                 EXECUTE format('GRANT azure_pg_admin TO %I', {name});\n\
                 EXECUTE format('ALTER ROLE %I CREATEROLE CREATEDB', {name});\n\
             END IF;\n\
         END IF;\n\
         END $$;\n"
    )
}

/// The gateway's question at each login: which principal the role is (object ID and type),
/// if it is an Entra role at all.
pub(crate) const ROLE_MAPPING: &str = "SELECT p.object_id, p.object_type \
     FROM pgaadauth.principals p JOIN pg_catalog.pg_roles r ON r.oid = p.role_oid \
     WHERE r.rolname = $1";
