//! Token scopes for Azure Database for PostgreSQL in each Azure cloud.
//!
//! Azure PostgreSQL accepts tokens issued for the "Azure OSSRDBMS Database" resource; each
//! sovereign cloud has its own resource URI. The token's `aud` claim is the resource URI, and the
//! scope a credential asks for is that URI followed by `/.default`.

use crate::error::Error;
use std::str::FromStr;

/// The management (Azure Resource Manager) scope. pgentra asks for a token with this scope only
/// when the database token carries no claim from which the PostgreSQL role name can be derived
/// (as Microsoft's reference libraries do).
pub const MANAGEMENT_SCOPE: &str = "https://management.azure.com/.default";

/// The Azure cloud that hosts the database server, which decides the token scope.
///
/// ```
/// use pgentra::Cloud;
/// assert_eq!(Cloud::Public.scope(), "https://ossrdbms-aad.database.windows.net/.default");
/// assert_eq!(Cloud::UsGovernment.audience(), "https://ossrdbms-aad.database.usgovcloudapi.net");
/// let custom = Cloud::custom_scope("https://example.test/.default");
/// assert_eq!(custom.scope(), "https://example.test/.default");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Cloud {
    /// Azure public cloud (`database.windows.net`).
    #[default]
    Public,
    /// Azure US Government (`database.usgovcloudapi.net`).
    UsGovernment,
    /// Azure operated by 21Vianet in China (`database.chinacloudapi.cn`).
    China,
    /// Any other scope, for private clouds or emulators that use their own audience.
    Custom {
        /// The full scope, usually ending in `/.default`.
        scope: String,
    },
}

impl Cloud {
    /// The Azure clouds whose database scope pgentra knows, in the order of their variants.
    pub const KNOWN: [Self; 3] = [Self::Public, Self::UsGovernment, Self::China];

    /// The cloud's name, which [`FromStr`] accepts: `public`, `us-government` or `china`
    /// (`None` for a custom scope).
    ///
    /// ```
    /// use pgentra::Cloud;
    /// let names: Vec<_> = Cloud::KNOWN.iter().filter_map(Cloud::name).collect();
    /// assert_eq!(names, ["public", "us-government", "china"]);
    /// assert_eq!(Cloud::custom_scope("https://example.test/.default").name(), None);
    /// ```
    pub fn name(&self) -> Option<&'static str> {
        match self {
            Self::Public => Some("public"),
            Self::UsGovernment => Some("us-government"),
            Self::China => Some("china"),
            Self::Custom { .. } => None,
        }
    }

    /// The cloud's name in `az cloud list`.
    fn az_name(&self) -> Option<&'static str> {
        match self {
            Self::Public => Some("AzureCloud"),
            Self::UsGovernment => Some("AzureUSGovernment"),
            Self::China => Some("AzureChinaCloud"),
            Self::Custom { .. } => None,
        }
    }

    /// The known cloud whose database audience is `audience` (an `aud` claim; a trailing `/` is
    /// ignored), if any.
    ///
    /// ```
    /// use pgentra::Cloud;
    /// let aud = "https://ossrdbms-aad.database.chinacloudapi.cn/";
    /// assert_eq!(Cloud::from_audience(aud), Some(Cloud::China));
    /// assert_eq!(Cloud::from_audience("https://management.azure.com"), None);
    /// ```
    pub fn from_audience(audience: &str) -> Option<Self> {
        let audience = audience.trim_end_matches('/');
        Self::KNOWN
            .into_iter()
            .find(|cloud| cloud.audience() == audience)
    }

    /// A cloud with a custom token scope.
    pub fn custom_scope(scope: impl Into<String>) -> Self {
        Self::Custom {
            scope: scope.into(),
        }
    }

    /// The scope to request a database token for.
    pub fn scope(&self) -> &str {
        match self {
            Self::Public => "https://ossrdbms-aad.database.windows.net/.default",
            Self::UsGovernment => "https://ossrdbms-aad.database.usgovcloudapi.net/.default",
            Self::China => "https://ossrdbms-aad.database.chinacloudapi.cn/.default",
            Self::Custom { scope } => scope,
        }
    }

    /// The `aud` claim of a token for this cloud: the scope without `/.default`.
    pub fn audience(&self) -> &str {
        let scope = self.scope();
        scope.strip_suffix("/.default").unwrap_or(scope)
    }

    /// The cloud whose Entra authority is `authority_host` (the value of `AZURE_AUTHORITY_HOST`),
    /// as the Azure SDK for Java picks it. Unknown hosts, such as an emulator's, give
    /// [`Cloud::Public`].
    ///
    /// ```
    /// use pgentra::Cloud;
    /// assert_eq!(Cloud::from_authority_host("https://login.microsoftonline.us/"), Cloud::UsGovernment);
    /// assert_eq!(Cloud::from_authority_host("https://login.chinacloudapi.cn"), Cloud::China);
    /// assert_eq!(Cloud::from_authority_host("https://127.0.0.1:8443"), Cloud::Public);
    /// ```
    pub fn from_authority_host(authority_host: &str) -> Self {
        let host = url::Url::parse(authority_host)
            .ok()
            .and_then(|url| url.host_str().map(str::to_ascii_lowercase))
            .unwrap_or_default();
        match host.as_str() {
            "login.microsoftonline.us" => Self::UsGovernment,
            "login.chinacloudapi.cn" | "login.partner.microsoftonline.cn" => Self::China,
            _ => Self::Public,
        }
    }
}

/// Parses a cloud's [name](Cloud::name), ignoring ASCII case; the names `az cloud list` gives
/// (`AzureCloud`, `AzureUSGovernment`, `AzureChinaCloud`) are accepted too. Anything else is an
/// [`Error::Config`] that lists the names.
///
/// ```
/// use pgentra::Cloud;
/// assert_eq!("us-government".parse::<Cloud>()?, Cloud::UsGovernment);
/// assert_eq!("AzureChinaCloud".parse::<Cloud>()?, Cloud::China);
/// assert!("mars".parse::<Cloud>().is_err());
/// for cloud in Cloud::KNOWN {
///     assert_eq!(cloud.name().unwrap().parse::<Cloud>()?, cloud);
/// }
/// # Ok::<(), pgentra::Error>(())
/// ```
impl FromStr for Cloud {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self, Error> {
        let matches = |known: &Option<&str>| known.is_some_and(|n| n.eq_ignore_ascii_case(name));
        Self::KNOWN
            .into_iter()
            .find(|cloud| matches(&cloud.name()) || matches(&cloud.az_name()))
            .ok_or_else(|| {
                let names: Vec<_> = Self::KNOWN.iter().filter_map(Self::name).collect();
                Error::config(format!(
                    "unknown cloud {name:?}: expected one of {} (for another cloud, set the token scope)",
                    names.join(", ")
                ))
            })
    }
}
