//! What client SQL may do inside an object's database.
//!
//! One request is one transaction, managed by Colony, so client `BEGIN`/`COMMIT`/`ROLLBACK`/
//! `SAVEPOINT` are refused, as are `ATTACH` (other files), tables named `_colony_*` (Colony's
//! key/value storage lives there) and PRAGMAs that change how the database is stored.

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};

/// Why a statement was refused, shown to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial(pub String);

const RESERVED_PREFIX: &str = "_colony_";

/// PRAGMAs client SQL may run. The second element says whether it may also be given a value.
const ALLOWED_PRAGMAS: &[(&str, bool)] = &[
    ("table_info", true),
    ("table_xinfo", true),
    ("table_list", true),
    ("index_info", true),
    ("index_xinfo", true),
    ("index_list", true),
    ("foreign_key_list", true),
    ("foreign_key_check", true),
    ("foreign_keys", true),
    ("defer_foreign_keys", true),
    ("quick_check", true),
    ("integrity_check", true),
    ("optimize", true),
    ("collation_list", false),
    ("function_list", false),
    ("page_count", false),
    ("page_size", false),
    ("freelist_count", false),
    ("data_version", false),
    ("user_version", false),
    ("case_sensitive_like", true),
];

fn reserved(name: &str) -> bool {
    name.len() >= RESERVED_PREFIX.len()
        && name[..RESERVED_PREFIX.len()].eq_ignore_ascii_case(RESERVED_PREFIX)
}

fn deny(why: impl Into<String>) -> (Authorization, Option<Denial>) {
    (Authorization::Deny, Some(Denial(why.into())))
}

/// Decides one authorizer callback. Colony's own statements (`user_mode == false`) may do
/// anything; client statements are checked.
pub fn authorize(ctx: &AuthContext<'_>, user_mode: bool) -> (Authorization, Option<Denial>) {
    if !user_mode {
        return (Authorization::Allow, None);
    }
    match ctx.action {
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => deny(
            "transactions are managed by Colony: each request runs in one transaction; send several statements as a \"batch\"",
        ),
        AuthAction::Attach { .. } | AuthAction::Detach { .. } => {
            deny("ATTACH and DETACH are not allowed")
        }
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } => {
            let name = pragma_name.to_ascii_lowercase();
            match ALLOWED_PRAGMAS.iter().find(|(n, _)| *n == name) {
                Some((_, settable)) if *settable || pragma_value.is_none() => {
                    (Authorization::Allow, None)
                }
                Some(_) => deny(format!("PRAGMA {pragma_name} may only be read")),
                None => deny(format!("PRAGMA {pragma_name} is not allowed")),
            }
        }
        AuthAction::Read { table_name, .. }
        | AuthAction::Insert { table_name }
        | AuthAction::Update { table_name, .. }
        | AuthAction::Delete { table_name }
        | AuthAction::CreateTable { table_name }
        | AuthAction::CreateTempTable { table_name }
        | AuthAction::DropTable { table_name }
        | AuthAction::DropTempTable { table_name }
        | AuthAction::AlterTable { table_name, .. }
        | AuthAction::Analyze { table_name }
        | AuthAction::CreateIndex { table_name, .. }
        | AuthAction::CreateTempIndex { table_name, .. }
        | AuthAction::DropIndex { table_name, .. }
        | AuthAction::DropTempIndex { table_name, .. }
        | AuthAction::CreateTrigger { table_name, .. }
        | AuthAction::CreateTempTrigger { table_name, .. }
        | AuthAction::DropTrigger { table_name, .. }
        | AuthAction::DropTempTrigger { table_name, .. }
        | AuthAction::CreateVtable { table_name, .. }
        | AuthAction::DropVtable { table_name, .. }
            if reserved(table_name) =>
        {
            deny(format!(
                "tables named {RESERVED_PREFIX}* are reserved for Colony (key/value storage lives there)"
            ))
        }
        AuthAction::Function { function_name }
            if function_name.eq_ignore_ascii_case("load_extension") =>
        {
            deny("loading extensions is not allowed")
        }
        AuthAction::CreateView { view_name } | AuthAction::CreateTempView { view_name }
            if reserved(view_name) =>
        {
            deny(format!(
                "names starting with {RESERVED_PREFIX} are reserved for Colony"
            ))
        }
        _ => (Authorization::Allow, None),
    }
}
