//! The one canonical form of an HTTP request: what the policy decides on and what the workload
//! receives, so that no spelling of a path lets a request past a rule that names its resource
//! (the issue "The layer-7 policy cannot be bypassed").
//!
//! ```text
//!   method, raw request-target ──► canonicalize ──► CanonicalRequest ──► Engine::evaluate
//!   ("DELETE", "/v1/items/./%61ll")   │              method  DELETE          (rules match the
//!                                     │              path    /v1/items/all    canonical path)
//!                                     │              forward /v1/items/all ──► the workload
//!                                     └──► CanonicalError ──► 400 Bad Request, with its reason
//! ```
//!
//! The path is normalised as RFC 3986 §6.2.2 says and as proxies do (Envoy's `normalize_path`
//! and `merge_slashes`): percent-encoded unreserved characters are decoded, every other
//! percent-encoding gets upper-case hex, dot segments are removed (encoded ones too) and repeated
//! slashes merged. Where the servers behind the mesh disagree on what a spelling means (`;`
//! parameters, `%2F`, `\`, an overlong UTF-8 form, `..` above the root) the request is refused
//! rather than guessed at. `policy/README.md` lists every case with examples.

use std::borrow::Cow;
use std::fmt;

/// Why a request cannot be put in canonical form. The proxy answers 400 Bad Request with the
/// message; `at` is a byte offset into the request-target.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    #[error("the method is not an HTTP token (RFC 9110 §9.1)")]
    Method,
    #[error("the request-target is empty")]
    Empty,
    #[error("the path does not start with `/`")]
    NotAbsolute,
    #[error("the request-target `*` is only for OPTIONS")]
    Asterisk,
    #[error("a request-target carries no fragment (`#`), at byte {at}")]
    Fragment { at: usize },
    #[error("`;` path parameters are refused (servers disagree on what they mean), at byte {at}")]
    Params { at: usize },
    #[error("`\\` is refused in a path (some servers read it as `/`), at byte {at}")]
    Backslash { at: usize },
    #[error("the byte {byte:#04x} is not allowed here (percent-encode it), at byte {at}")]
    Byte { at: usize, byte: u8 },
    #[error("`%` is not followed by two hex digits, at byte {at}")]
    Percent { at: usize },
    #[error("`%2F` (an encoded `/`) is refused (servers disagree on it), at byte {at}")]
    EncodedSlash { at: usize },
    #[error("`%5C` (an encoded `\\`) is refused (some servers read it as `/`), at byte {at}")]
    EncodedBackslash { at: usize },
    #[error("an encoded control character (`%{byte:02X}`) is refused, at byte {at}")]
    EncodedControl { at: usize, byte: u8 },
    #[error("the percent-encoded bytes are not UTF-8 (an overlong form?), at byte {at}")]
    Utf8 { at: usize },
    #[error("`..` climbs above the root")]
    AboveRoot,
    #[error("only `http://` and `https://` absolute-form targets are accepted")]
    Scheme,
    #[error("userinfo (`user@`) in the authority is refused, at byte {at}")]
    Userinfo { at: usize },
    #[error("the authority is not `host` or `host:port`, at byte {at}")]
    Authority { at: usize },
}

/// An HTTP method: an RFC 9110 token, compared as written (`delete` is not `DELETE`; deny rules
/// also match other cases, see `policy/README.md`). Borrowed on the request path, owned
/// (`Method<'static>`) in rules and tests.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Method<'a>(Cow<'a, str>);

impl<'a> Method<'a> {
    pub const GET: Method<'static> = Method(Cow::Borrowed("GET"));
    pub const HEAD: Method<'static> = Method(Cow::Borrowed("HEAD"));
    pub const POST: Method<'static> = Method(Cow::Borrowed("POST"));
    pub const PUT: Method<'static> = Method(Cow::Borrowed("PUT"));
    pub const DELETE: Method<'static> = Method(Cow::Borrowed("DELETE"));
    pub const CONNECT: Method<'static> = Method(Cow::Borrowed("CONNECT"));
    pub const OPTIONS: Method<'static> = Method(Cow::Borrowed("OPTIONS"));
    pub const TRACE: Method<'static> = Method(Cow::Borrowed("TRACE"));
    pub const PATCH: Method<'static> = Method(Cow::Borrowed("PATCH"));

    /// `s` as a method if it is a token (1 or more of `A-Z a-z 0-9 !#$%&'*+-.^_`|~`).
    pub fn parse(s: &'a str) -> Result<Method<'a>, CanonicalError> {
        if s.is_empty() || !s.bytes().all(is_tchar) {
            return Err(CanonicalError::Method);
        }
        Ok(Method(Cow::Borrowed(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_owned(self) -> Method<'static> {
        Method(Cow::Owned(self.0.into_owned()))
    }

    /// The bit of a standard method (RFC 9110 §9 and PATCH) spelled exactly so, by which the
    /// engine compares it without comparing names; 0 for any other token.
    pub(crate) fn bit(name: &str) -> u16 {
        match name {
            "GET" => 1 << 0,
            "HEAD" => 1 << 1,
            "POST" => 1 << 2,
            "PUT" => 1 << 3,
            "DELETE" => 1 << 4,
            "CONNECT" => 1 << 5,
            "OPTIONS" => 1 << 6,
            "TRACE" => 1 << 7,
            "PATCH" => 1 << 8,
            _ => 0,
        }
    }

    /// The bit of a standard method in any letter case; 0 for any other token.
    pub(crate) fn folded_bit(name: &str) -> u16 {
        const LONGEST: usize = 7;
        match Method::bit(name) {
            0 if name.len() <= LONGEST => {
                let mut upper = [0u8; LONGEST];
                upper[..name.len()].copy_from_slice(name.as_bytes());
                upper.make_ascii_uppercase();
                std::str::from_utf8(&upper[..name.len()]).map_or(0, Method::bit)
            }
            bit => bit,
        }
    }
}

impl fmt::Display for Method<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The form the request-target came in (RFC 9112 §3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetForm {
    /// `/path?query`, and HTTP/2's `:path`.
    Origin,
    /// `http://host/path?query`; forwarded in origin-form.
    Absolute,
    /// `host:port`, for CONNECT.
    Authority,
    /// `*`, for OPTIONS.
    Asterisk,
}

/// A request the policy can decide on: a method token and a target in canonical form. Made only
/// by [`canonicalize`], so whatever the engine sees has been canonicalised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonicalRequest<'a> {
    method: Method<'a>,
    /// [`Method::bit`] and [`Method::folded_bit`] of the method, worked out once per request.
    pub(crate) method_bit: u16,
    pub(crate) method_folded_bit: u16,
    form: TargetForm,
    scheme: Option<&'a str>,
    authority: Option<&'a str>,
    /// Empty for the authority and asterisk forms.
    path: Cow<'a, str>,
    /// Whether the canonical path still holds a percent-encoding.
    pub(crate) path_has_pct: bool,
    query: Option<&'a str>,
    /// The target as received.
    raw: &'a str,
    /// Whether [`CanonicalRequest::request_target`] differs from `raw`.
    rewritten: bool,
}

impl<'a> CanonicalRequest<'a> {
    pub fn method(&self) -> &Method<'a> {
        &self.method
    }

    pub fn form(&self) -> TargetForm {
        self.form
    }

    /// The canonical path the rules are matched against; `None` for the authority and
    /// asterisk forms, which no `paths` entry matches.
    pub fn path(&self) -> Option<&str> {
        match self.form {
            TargetForm::Origin | TargetForm::Absolute => Some(&self.path),
            TargetForm::Authority | TargetForm::Asterisk => None,
        }
    }

    /// The query as received (validated, never rewritten), without the `?`.
    pub fn query(&self) -> Option<&'a str> {
        self.query
    }

    /// The authority of an absolute-form or authority-form target. When it is `Some` for an
    /// absolute-form target the proxy sends it to the workload as `Host`, and the engine holds
    /// it as one more value of the `host` header.
    pub fn authority(&self) -> Option<&'a str> {
        self.authority
    }

    /// What to send to the workload as the request-target: the canonical path and the query as
    /// received (origin-form, also for an absolute-form target), `*`, or the authority. Borrowed
    /// when it is the target as received.
    pub fn request_target(&self) -> Cow<'a, str> {
        if !self.rewritten {
            return Cow::Borrowed(self.raw);
        }
        match (self.form, self.query) {
            (TargetForm::Authority | TargetForm::Asterisk, _) => Cow::Borrowed(self.raw),
            (_, None) => Cow::Owned(self.path.to_string()),
            (_, Some(q)) => Cow::Owned(format!("{}?{q}", self.path)),
        }
    }

    /// Whether [`CanonicalRequest::request_target`] differs from the target received, so the
    /// proxy must rewrite the request before forwarding it.
    pub fn is_rewritten(&self) -> bool {
        self.rewritten
    }
}

/// `DELETE /v1/items/all?x=1`, `GET http://api/v1/items`, `CONNECT db:5432`, `OPTIONS *`: the
/// method and the canonical target the policy decided on.
impl fmt::Display for CanonicalRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.method)?;
        match self.form {
            TargetForm::Authority | TargetForm::Asterisk => return f.write_str(self.raw),
            TargetForm::Absolute => {
                write!(f, "{}://{}", self.scheme.unwrap_or("http"), self.authority.unwrap_or(""))?
            }
            TargetForm::Origin => {}
        }
        f.write_str(&self.path)?;
        match self.query {
            Some(q) => write!(f, "?{q}"),
            None => Ok(()),
        }
    }
}

/// Puts `method` and the raw request-target `target` in canonical form, or says why the request
/// must be refused. `target` is any of origin-form (`/p?q`, also HTTP/2's `:path`), absolute-form
/// (`http://host/p?q`), authority-form (`host:port`, with CONNECT only) and asterisk-form (`*`,
/// with OPTIONS only).
pub fn canonicalize<'a>(method: &'a str, target: &'a str) -> Result<CanonicalRequest<'a>, CanonicalError> {
    let method = Method::parse(method)?;
    let name = method.as_str();
    let mut req = CanonicalRequest {
        method_bit: Method::bit(name),
        method_folded_bit: Method::folded_bit(name),
        method,
        form: TargetForm::Origin,
        scheme: None,
        authority: None,
        path: Cow::Borrowed(""),
        path_has_pct: false,
        query: None,
        raw: target,
        rewritten: false,
    };
    let (options, connect) = (req.method == Method::OPTIONS, req.method == Method::CONNECT);
    if target.is_empty() {
        return Err(CanonicalError::Empty);
    }
    if target == "*" {
        if !options {
            return Err(CanonicalError::Asterisk);
        }
        req.form = TargetForm::Asterisk;
        return Ok(req);
    }
    // Where the path starts; what comes before is `scheme://authority` for absolute-form.
    let start = if target.starts_with('/') {
        0
    } else if let Some((scheme, rest)) = absolute_form(target) {
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let base = target.len() - rest.len();
        authority(&rest[..end], base, false)?;
        req.form = TargetForm::Absolute;
        req.scheme = Some(scheme);
        req.authority = Some(&rest[..end]);
        req.rewritten = true;
        base + end
    } else if connect {
        authority(target, 0, true)?;
        req.form = TargetForm::Authority;
        req.authority = Some(target);
        return Ok(req);
    } else if target.contains("://") {
        return Err(CanonicalError::Scheme);
    } else {
        return Err(CanonicalError::NotAbsolute);
    };
    let rest = &target[start..];
    let (path, query) = match rest.find('?') {
        Some(q) => (&rest[..q], Some(&rest[q + 1..])),
        None => (rest, None),
    };
    if let Some(q) = query {
        validate_query(q, start + path.len() + 1)?;
    }
    let (canonical, has_pct) = if path.is_empty() {
        // `http://host` and `http://host?q` name `/` (RFC 9112 §3.2.1).
        req.rewritten = true;
        (Cow::Borrowed("/"), false)
    } else if !path.starts_with('/') {
        // Only a fragment can end an absolute-form authority and not start a path or a query.
        return Err(CanonicalError::Fragment { at: start });
    } else {
        canonical_path_at(path, start)?
    };
    req.rewritten |= canonical.len() != path.len() || matches!(canonical, Cow::Owned(_));
    req.path = canonical;
    req.path_has_pct = has_pct;
    req.query = query;
    Ok(req)
}

/// The canonical form of a path alone (no query): the form rule paths are written in.
pub fn canonical_path(path: &str) -> Result<Cow<'_, str>, CanonicalError> {
    if path.is_empty() {
        return Err(CanonicalError::Empty);
    }
    if let Some(at) = path.find('?') {
        return Err(CanonicalError::Byte { at, byte: b'?' });
    }
    canonical_path_at(path, 0).map(|(p, _)| p)
}

/// `Some((scheme, rest after "://"))` when `target` is `http://…` or `https://…` (any case).
fn absolute_form(target: &str) -> Option<(&str, &str)> {
    let colon = target.find("://")?;
    let scheme = &target[..colon];
    (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https"))
        .then(|| (scheme, &target[colon + 3..]))
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 §2.2, less `;`, which is refused in paths.
fn is_sub_delim(b: u8) -> bool {
    matches!(b, b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=')
}

/// What a path segment may hold unencoded (RFC 3986 §3.3 `pchar`, less `;`).
const PATH_RAW: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') // unreserved
            || matches!(c, b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=') // sub-delims
            || matches!(c, b':' | b'@');
        b += 1;
    }
    t
};

fn is_path_raw(b: u8) -> bool {
    PATH_RAW[usize::from(b)]
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// The byte `%HH` at `at` encodes.
fn decode_at(b: &[u8], at: usize, base: usize) -> Result<u8, CanonicalError> {
    match (b.get(at + 1).copied().and_then(hex), b.get(at + 2).copied().and_then(hex)) {
        (Some(h), Some(l)) => Ok(h << 4 | l),
        _ => Err(CanonicalError::Percent { at: base + at }),
    }
}

/// The query may hold any visible ASCII but `#`, and valid percent-encodings; it is never
/// rewritten (the policy does not look at it).
fn validate_query(q: &str, base: usize) -> Result<(), CanonicalError> {
    let b = q.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'#' => return Err(CanonicalError::Fragment { at: base + i }),
            b'%' => {
                decode_at(b, i, base)?;
            }
            0x21..=0x7e => {}
            _ => return Err(CanonicalError::Byte { at: base + i, byte: c }),
        }
    }
    Ok(())
}

/// `host` or `host:port` (the port required when `port_required`): a registered name or an IP
/// literal in brackets, no userinfo.
fn authority(a: &str, base: usize, port_required: bool) -> Result<(), CanonicalError> {
    let b = a.as_bytes();
    if let Some(at) = a.find('@') {
        return Err(CanonicalError::Userinfo { at: base + at });
    }
    let bad = |at: usize| CanonicalError::Authority { at: base + at };
    let host_end = if b.first() == Some(&b'[') {
        let close = a.find(']').ok_or(bad(0))?;
        if close == 1 || !b[1..close].iter().all(|&c| c.is_ascii_hexdigit() || matches!(c, b':' | b'.')) {
            return Err(bad(1));
        }
        close + 1
    } else {
        let end = a.find(':').unwrap_or(a.len());
        let mut i = 0;
        while i < end {
            match b[i] {
                b'%' => {
                    decode_at(b, i, base)?;
                    i += 3;
                }
                c if is_unreserved(c) || is_sub_delim(c) => i += 1,
                b'#' => return Err(CanonicalError::Fragment { at: base + i }),
                _ => return Err(bad(i)),
            }
        }
        if end == 0 {
            return Err(bad(0));
        }
        end
    };
    match &a[host_end..] {
        "" if !port_required => Ok(()),
        port => {
            let digits = port.strip_prefix(':').ok_or(bad(host_end))?;
            match digits.parse::<u16>() {
                Ok(_) if digits.bytes().all(|c| c.is_ascii_digit()) => Ok(()),
                _ => Err(bad(host_end)),
            }
        }
    }
}

/// Builds the canonical path as a borrow of the input for as long as it equals a prefix of it,
/// so a path that is already canonical costs no allocation.
struct Out<'a> {
    src: &'a str,
    /// While `buf` is `None`, the output is `src[..len]`.
    len: usize,
    buf: Option<String>,
}

impl<'a> Out<'a> {
    fn bytes(&self) -> &[u8] {
        match &self.buf {
            Some(b) => b.as_bytes(),
            None => &self.src.as_bytes()[..self.len],
        }
    }

    fn own(&mut self) -> &mut String {
        let (src, len) = (self.src, self.len);
        self.buf.get_or_insert_with(|| {
            let mut s = String::with_capacity(src.len());
            s.push_str(&src[..len]);
            s
        })
    }

    /// Appends `src[from..to]`.
    fn copy(&mut self, from: usize, to: usize) {
        if self.buf.is_none() && from == self.len {
            self.len = to;
        } else {
            let src = self.src;
            self.own().push_str(&src[from..to]);
        }
    }

    fn push(&mut self, c: char) {
        self.own().push(c);
    }

    /// Drops the last segment of an output that ends with `/`, keeping the `/` before it;
    /// `false` when there is none (the output is `/`).
    fn pop_segment(&mut self) -> bool {
        let bytes = self.bytes();
        let Some(slash) = bytes[..bytes.len() - 1].iter().rposition(|&c| c == b'/') else {
            return false;
        };
        match &mut self.buf {
            Some(b) => b.truncate(slash + 1),
            None => self.len = slash + 1,
        }
        true
    }

    fn finish(self) -> Cow<'a, str> {
        match self.buf {
            Some(b) => Cow::Owned(b),
            None => Cow::Borrowed(&self.src[..self.len]),
        }
    }
}

/// Checks, a byte at a time, that the bytes a path decodes to are UTF-8 (RFC 3629: no overlong
/// forms, no surrogates, nothing above U+10FFFF), without decoding the path into a buffer.
#[derive(Default)]
struct Utf8 {
    /// Continuation bytes still expected.
    need: u8,
    /// The range the next continuation byte must fall in (narrower after some lead bytes).
    lo: u8,
    hi: u8,
}

impl Utf8 {
    fn push(&mut self, b: u8) -> bool {
        if self.need > 0 {
            if b < self.lo || b > self.hi {
                return false;
            }
            self.need -= 1;
            (self.lo, self.hi) = (0x80, 0xbf);
            return true;
        }
        let (need, lo, hi) = match b {
            0x00..=0x7f => return true,
            0xc2..=0xdf => (1, 0x80, 0xbf),
            0xe0 => (2, 0xa0, 0xbf),
            0xe1..=0xec | 0xee..=0xef => (2, 0x80, 0xbf),
            0xed => (2, 0x80, 0x9f),
            0xf0 => (3, 0x90, 0xbf),
            0xf1..=0xf3 => (3, 0x80, 0xbf),
            0xf4 => (3, 0x80, 0x8f),
            _ => return false,
        };
        (self.need, self.lo, self.hi) = (need, lo, hi);
        true
    }

    fn complete(&self) -> bool {
        self.need == 0
    }
}

/// 1 for a segment that is `.`, 2 for `..` (either dot possibly written `%2E`), else 0.
fn dots(seg: &[u8]) -> u8 {
    let mut n = 0;
    let mut i = 0;
    while i < seg.len() {
        if seg[i] == b'.' {
            i += 1;
        } else if seg[i] == b'%'
            && seg.get(i + 1) == Some(&b'2')
            && matches!(seg.get(i + 2), Some(b'e' | b'E'))
        {
            i += 3;
        } else {
            return 0;
        }
        n += 1;
        if n > 2 {
            return 0;
        }
    }
    n
}

/// Canonicalises `path` (starting with `/`, no query), found at byte `base` of the target.
/// Returns the path and whether it still holds a percent-encoding.
fn canonical_path_at(path: &str, base: usize) -> Result<(Cow<'_, str>, bool), CanonicalError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(CanonicalError::NotAbsolute);
    }
    let mut out = Out { src: path, len: 0, buf: None };
    let mut utf8 = Utf8::default();
    let mut has_pct = false;
    let utf8_err = |at: usize| CanonicalError::Utf8 { at: base + at };
    out.copy(0, 1);
    let mut start = 1;
    loop {
        let end = b[start..].iter().position(|&c| c == b'/').map_or(b.len(), |i| start + i);
        let seg = &b[start..end];
        let more = end < b.len();
        // The output ends with `/` here. An empty segment is a repeated slash (merged); `.` and
        // `..` are removed (RFC 3986 §5.2.4), leaving the `/` before them: `/a/b/..` is `/a/`.
        match dots(seg) {
            _ if seg.is_empty() => {}
            1 => {}
            2 => {
                if !out.pop_segment() {
                    return Err(CanonicalError::AboveRoot);
                }
            }
            _ => {
                let mut i = start;
                while i < end {
                    let c = b[i];
                    if c == b'%' {
                        let v = decode_at(b, i, base)?;
                        match v {
                            b'/' => return Err(CanonicalError::EncodedSlash { at: base + i }),
                            b'\\' => return Err(CanonicalError::EncodedBackslash { at: base + i }),
                            0x00..=0x1f | 0x7f => {
                                return Err(CanonicalError::EncodedControl { at: base + i, byte: v });
                            }
                            _ => {}
                        }
                        if !utf8.push(v) {
                            return Err(utf8_err(i));
                        }
                        if is_unreserved(v) {
                            out.push(char::from(v));
                        } else if !b[i + 1..i + 3].iter().any(u8::is_ascii_lowercase) {
                            out.copy(i, i + 3);
                            has_pct = true;
                        } else {
                            let [h, l] = [b[i + 1], b[i + 2]].map(|d| char::from(d.to_ascii_uppercase()));
                            out.push('%');
                            out.push(h);
                            out.push(l);
                            has_pct = true;
                        }
                        i += 3;
                        continue;
                    }
                    if !is_path_raw(c) {
                        return Err(match c {
                            b';' => CanonicalError::Params { at: base + i },
                            b'\\' => CanonicalError::Backslash { at: base + i },
                            b'#' => CanonicalError::Fragment { at: base + i },
                            _ => CanonicalError::Byte { at: base + i, byte: c },
                        });
                    }
                    // A run of characters kept as they are: ASCII, so it may not cut a
                    // multi-byte character short.
                    if !utf8.complete() {
                        return Err(utf8_err(i));
                    }
                    let run = b[i..end].iter().position(|&c| !is_path_raw(c)).map_or(end, |n| i + n);
                    out.copy(i, run);
                    i = run;
                }
                if more {
                    out.copy(end, end + 1);
                }
            }
        }
        // A multi-byte character never spans a `/` (or a removed segment).
        if !utf8.complete() {
            return Err(utf8_err(end));
        }
        if !more {
            break;
        }
        start = end + 1;
    }
    Ok((out.finish(), has_pct))
}

/// The next byte of a canonical path at `*i`, a percent-encoding counted as the byte it stands
/// for when `decode`; ASCII letters lower-cased when `fold`.
fn unit(s: &[u8], i: &mut usize, decode: bool, fold: bool) -> u8 {
    let mut c = s[*i];
    *i += 1;
    if decode
        && c == b'%'
        && let (Some(h), Some(l)) = (s.get(*i).copied().and_then(hex), s.get(*i + 1).copied().and_then(hex))
    {
        c = h << 4 | l;
        *i += 2;
    }
    if fold { c.to_ascii_lowercase() } else { c }
}

/// How a rule compares its path with a request's: by spelling (allow rules) or by the bytes
/// the paths decode to (deny rules, so that `%40` and `@` are one), ASCII case kept or ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Compare {
    pub decode: bool,
    pub fold: bool,
}

impl Compare {
    /// Where in `path` the units of `pattern` end, if `path` starts with them. `has_pct`: either
    /// may hold a percent-encoding (when neither does, bytes are compared as they are).
    fn prefix_end(self, pattern: &str, path: &str, has_pct: bool) -> Option<usize> {
        let (p, s) = (pattern.as_bytes(), path.as_bytes());
        if !self.fold && (!self.decode || !has_pct) {
            return s.starts_with(p).then_some(p.len());
        }
        let (mut i, mut j) = (0, 0);
        while i < p.len() {
            if j >= s.len()
                || unit(p, &mut i, self.decode, self.fold) != unit(s, &mut j, self.decode, self.fold)
            {
                return None;
            }
        }
        Some(j)
    }

    /// Whether canonical `path`, taken without a trailing `/`, is `pattern` (given without).
    pub fn exact(self, pattern: &str, path: &str, has_pct: bool) -> bool {
        let path = strip_slash(path);
        self.prefix_end(pattern, path, has_pct) == Some(path.len())
    }

    /// Whether canonical `path` is `base` or below it (`base` without a trailing `/`).
    pub fn under(self, base: &str, path: &str, has_pct: bool) -> bool {
        let path = strip_slash(path);
        match self.prefix_end(base, path, has_pct) {
            Some(end) => end == path.len() || path.as_bytes()[end] == b'/',
            None => false,
        }
    }
}

/// A path without its trailing `/` (`/` itself becomes empty): `/a/b/` and `/a/b` name one
/// resource to the rules.
pub(crate) fn strip_slash(p: &str) -> &str {
    p.strip_suffix('/').unwrap_or(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a target turns into: `Ok(forwarded request-target)` or the refusal.
    fn canon(method: &str, target: &str) -> Result<String, CanonicalError> {
        canonicalize(method, target).map(|c| c.request_target().into_owned())
    }

    #[test]
    fn paths_take_one_canonical_form() {
        use CanonicalError::*;
        let long_ok = format!("/{}", "a/".repeat(20_000));
        let long_slashes = format!("/a{}b", "/".repeat(50_000));
        let long_dots = format!("/{}x", "a/../".repeat(10_000));
        let cases: Vec<(&str, Result<&str, CanonicalError>)> = vec![
            // Already canonical: forwarded as received.
            ("/", Ok("/")),
            ("/v1/items/all", Ok("/v1/items/all")),
            ("/v1/items/all/", Ok("/v1/items/all/")),
            ("/v1/items/all?x=1&y=%2F", Ok("/v1/items/all?x=1&y=%2F")),
            ("/v1/items/all?", Ok("/v1/items/all?")),
            ("/a:b@c!$&'()*+,=", Ok("/a:b@c!$&'()*+,=")),
            ("/%20/%C3%A9", Ok("/%20/%C3%A9")),
            ("/...", Ok("/...")),
            ("/.a/a./..b", Ok("/.a/a./..b")),
            // Repeated slashes merge, at the start too.
            ("/v1/items//all", Ok("/v1/items/all")),
            ("//v1/items/all", Ok("/v1/items/all")),
            ("///", Ok("/")),
            ("/v1/items/all//", Ok("/v1/items/all/")),
            // Dot segments go, encoded ones too.
            ("/v1/items/./all", Ok("/v1/items/all")),
            ("/v1/items/%2e/all", Ok("/v1/items/all")),
            ("/v1/x/../items/all", Ok("/v1/items/all")),
            ("/v1/x/%2e%2E/items/all", Ok("/v1/items/all")),
            ("/v1/x/.%2e/items/all", Ok("/v1/items/all")),
            ("/v1/items/all/.", Ok("/v1/items/all/")),
            ("/v1/items/all/x/..", Ok("/v1/items/all/")),
            ("/.", Ok("/")),
            ("/./", Ok("/")),
            ("/a/..", Ok("/")),
            ("/a//..", Ok("/")),
            ("/a/.//b", Ok("/a/b")),
            ("/a/b/../../c", Ok("/c")),
            // Unreserved characters are decoded; other encodings get upper-case hex.
            ("/v1/items/%61ll", Ok("/v1/items/all")),
            ("/v1/items/%41%4c%4C", Ok("/v1/items/ALL")),
            ("/%7e%2D%5f%2E%30", Ok("/~-_.0")),
            ("/a%2fb", Err(EncodedSlash { at: 2 })),
            ("/a%3bb", Ok("/a%3Bb")),
            ("/a%c3%a9", Ok("/a%C3%A9")),
            ("/a%40b", Ok("/a%40b")),
            // Double encoding stays encoded: `%252e` is `%2e` as data, not a dot.
            ("/v1/items/%252e%252e/admin", Ok("/v1/items/%252e%252e/admin")),
            ("/%25", Ok("/%25")),
            ("/%2525", Ok("/%2525")),
            // Refused.
            ("", Err(Empty)),
            ("v1/items", Err(NotAbsolute)),
            ("/..", Err(AboveRoot)),
            ("/../admin", Err(AboveRoot)),
            ("/v1/items/../../admin", Ok("/admin")),
            ("/v1/items/../../../admin", Err(AboveRoot)),
            ("/a/%2e%2e/%2E%2E/admin", Err(AboveRoot)),
            ("/v1/items/all;x", Err(Params { at: 13 })),
            ("/v1/items/all;", Err(Params { at: 13 })),
            ("/v1;x/items", Err(Params { at: 3 })),
            ("/..;/admin", Err(Params { at: 3 })),
            ("/a\\b", Err(Backslash { at: 2 })),
            ("/..\\admin", Err(Backslash { at: 3 })),
            ("/a%5cb", Err(EncodedBackslash { at: 2 })),
            ("/a%00b", Err(EncodedControl { at: 2, byte: 0 })),
            ("/a%0d%0aX:1", Err(EncodedControl { at: 2, byte: 0x0d })),
            ("/a%7F", Err(EncodedControl { at: 2, byte: 0x7f })),
            ("/a\0", Err(Byte { at: 2, byte: 0 })),
            ("/a b", Err(Byte { at: 2, byte: b' ' })),
            ("/a\tb", Err(Byte { at: 2, byte: b'\t' })),
            ("/a\r\nb", Err(Byte { at: 2, byte: b'\r' })),
            ("/a\x7f", Err(Byte { at: 2, byte: 0x7f })),
            ("/caf\u{e9}", Err(Byte { at: 4, byte: 0xc3 })),
            ("/a\"b", Err(Byte { at: 2, byte: b'"' })),
            ("/a<b>", Err(Byte { at: 2, byte: b'<' })),
            ("/a{b}", Err(Byte { at: 2, byte: b'{' })),
            ("/a|b", Err(Byte { at: 2, byte: b'|' })),
            ("/[::1]", Err(Byte { at: 1, byte: b'[' })),
            ("/a#frag", Err(Fragment { at: 2 })),
            ("/a?b#frag", Err(Fragment { at: 4 })),
            ("/a?b c", Err(Byte { at: 4, byte: b' ' })),
            ("/a?b%zz", Err(Percent { at: 4 })),
            ("/a%zz", Err(Percent { at: 2 })),
            ("/a%4", Err(Percent { at: 2 })),
            ("/a%", Err(Percent { at: 2 })),
            ("/a%%41", Err(Percent { at: 2 })),
            ("/%u002e%u002e/admin", Err(Percent { at: 1 })),
            // Percent-encoded bytes that are not UTF-8.
            ("/%C0%AF", Err(Utf8 { at: 1 })),
            ("/%c0%ae%c0%ae/admin", Err(Utf8 { at: 1 })),
            ("/%E0%80%AF", Err(Utf8 { at: 4 })),
            ("/%ED%A0%80", Err(Utf8 { at: 4 })),
            ("/%F4%90%80%80", Err(Utf8 { at: 4 })),
            ("/%FF", Err(Utf8 { at: 1 })),
            ("/%C3", Err(Utf8 { at: 4 })),
            ("/%C3/%A9", Err(Utf8 { at: 4 })),
            ("/%C3a", Err(Utf8 { at: 4 })),
            ("/%80", Err(Utf8 { at: 1 })),
            ("/%F0%9F%A6%80", Ok("/%F0%9F%A6%80")),
            // Very long paths are linear work.
            (&long_ok, Ok(&long_ok)),
        ];
        for (target, want) in cases {
            let got = canon("GET", target);
            assert_eq!(got.as_deref().map_err(Clone::clone), want, "{target:?}");
        }
        assert_eq!(canon("GET", &long_slashes).unwrap(), "/a/b");
        assert_eq!(canon("GET", &long_dots).unwrap(), "/x");
        assert_eq!(canon("GET", &format!("/{}", "../".repeat(10_000))), Err(AboveRoot));
    }

    #[test]
    fn each_form_of_request_target_is_read() {
        use CanonicalError::*;
        type Want<'a> =
            Result<(TargetForm, Option<&'a str>, Option<&'a str>, &'a str, &'a str), CanonicalError>;
        // (method, target) -> (form, path, authority, forwarded target, display)
        let cases: Vec<(&str, &str, Want<'_>)> = vec![
            ("GET", "/a?b", Ok((TargetForm::Origin, Some("/a"), None, "/a?b", "GET /a?b"))),
            (
                "GET",
                "http://api:80/v1/./items//7?x",
                Ok((
                    TargetForm::Absolute,
                    Some("/v1/items/7"),
                    Some("api:80"),
                    "/v1/items/7?x",
                    "GET http://api:80/v1/items/7?x",
                )),
            ),
            (
                "DELETE",
                "HTTPS://evil.example/v1/items/%61ll",
                Ok((
                    TargetForm::Absolute,
                    Some("/v1/items/all"),
                    Some("evil.example"),
                    "/v1/items/all",
                    "DELETE HTTPS://evil.example/v1/items/all",
                )),
            ),
            ("GET", "http://api", Ok((TargetForm::Absolute, Some("/"), Some("api"), "/", "GET http://api/"))),
            (
                "GET",
                "http://api?q",
                Ok((TargetForm::Absolute, Some("/"), Some("api"), "/?q", "GET http://api/?q")),
            ),
            (
                "GET",
                "http://[::1]:8080/",
                Ok((TargetForm::Absolute, Some("/"), Some("[::1]:8080"), "/", "GET http://[::1]:8080/")),
            ),
            ("GET", "http://user@api/", Err(Userinfo { at: 11 })),
            ("GET", "http://api:x/", Err(Authority { at: 10 })),
            ("GET", "http://api:99999/", Err(Authority { at: 10 })),
            ("GET", "http:///a", Err(Authority { at: 7 })),
            ("GET", "http://a b/", Err(Authority { at: 8 })),
            ("GET", "http://api/../x", Err(AboveRoot)),
            ("GET", "ftp://api/x", Err(Scheme)),
            (
                "CONNECT",
                "db:5432",
                Ok((TargetForm::Authority, None, Some("db:5432"), "db:5432", "CONNECT db:5432")),
            ),
            (
                "CONNECT",
                "[2001:db8::1]:443",
                Ok((
                    TargetForm::Authority,
                    None,
                    Some("[2001:db8::1]:443"),
                    "[2001:db8::1]:443",
                    "CONNECT [2001:db8::1]:443",
                )),
            ),
            ("CONNECT", "db", Err(Authority { at: 2 })),
            ("CONNECT", "db:", Err(Authority { at: 2 })),
            ("CONNECT", "u@db:1", Err(Userinfo { at: 1 })),
            // HTTP/2 extended CONNECT (RFC 8441) carries a `:path`.
            ("CONNECT", "/chat", Ok((TargetForm::Origin, Some("/chat"), None, "/chat", "CONNECT /chat"))),
            ("GET", "db:5432", Err(NotAbsolute)),
            ("OPTIONS", "*", Ok((TargetForm::Asterisk, None, None, "*", "OPTIONS *"))),
            ("GET", "*", Err(Asterisk)),
            ("OPTIONS", "*/x", Err(NotAbsolute)),
            // Methods are tokens, kept as written.
            ("PURGE", "/a", Ok((TargetForm::Origin, Some("/a"), None, "/a", "PURGE /a"))),
            ("delete", "/a", Ok((TargetForm::Origin, Some("/a"), None, "/a", "delete /a"))),
            ("GET /a", "/a", Err(Method)),
            ("", "/a", Err(Method)),
            ("G\u{e9}T", "/a", Err(Method)),
            ("GET\t", "/a", Err(Method)),
        ];
        for (method, target, want) in cases {
            let got = canonicalize(method, target).map(|c| {
                let display = c.to_string();
                (
                    c.form(),
                    c.path().map(str::to_owned),
                    c.authority(),
                    c.request_target().into_owned(),
                    display,
                )
            });
            let want = want.map(|(f, p, a, t, d)| (f, p.map(str::to_owned), a, t.to_owned(), d.to_owned()));
            assert_eq!(got, want, "{method} {target}");
        }
    }

    #[test]
    fn only_a_rewritten_target_is_copied() {
        let same = canonicalize("GET", "/v1/items/7?q=1").unwrap();
        assert!(!same.is_rewritten());
        assert!(matches!(same.request_target(), Cow::Borrowed("/v1/items/7?q=1")));
        assert!(matches!(same.path, Cow::Borrowed(_)));
        // A trailing repeated slash drops bytes: the path is still a borrow, the target is not.
        let trimmed = canonicalize("GET", "/a/b//?q").unwrap();
        assert!(matches!(trimmed.path, Cow::Borrowed("/a/b/")));
        assert!(trimmed.is_rewritten());
        assert_eq!(trimmed.request_target(), "/a/b/?q");
        let changed = canonicalize("GET", "/a/%62").unwrap();
        assert!(changed.is_rewritten());
        assert_eq!(changed.request_target(), "/a/b");
        for t in ["*", "db:1"] {
            let c = canonicalize(if t == "*" { "OPTIONS" } else { "CONNECT" }, t).unwrap();
            assert!(!c.is_rewritten());
        }
    }

    #[test]
    fn method_bits_tell_standard_methods_apart_in_any_case() {
        const STANDARD: [&str; 9] =
            ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
        for (i, name) in STANDARD.iter().enumerate() {
            assert_eq!(Method::bit(name), 1 << i, "{name}");
            assert_eq!(Method::folded_bit(&name.to_ascii_lowercase()), 1 << i, "{name}");
        }
        let cases =
            [("GET", 1, 1), ("get", 0, 1), ("Delete", 0, 1 << 4), ("PATCH", 1 << 8, 1 << 8), ("PURGE", 0, 0)];
        for (name, bit, folded) in cases {
            assert_eq!((Method::bit(name), Method::folded_bit(name)), (bit, folded), "{name}");
        }
    }

    #[test]
    fn the_utf8_check_agrees_with_the_standard_library() {
        let mut samples: Vec<Vec<u8>> = vec![
            vec![0xc0, 0xaf],
            vec![0xe0, 0x9f, 0xbf],
            vec![0xed, 0xbf, 0xbf],
            vec![0xf0, 0x8f, 0xbf, 0xbf],
            vec![0xf4, 0x8f, 0xbf, 0xbf],
            vec![0xf5, 0x80, 0x80, 0x80],
            "h\u{e9}\u{20ac}\u{1f980}\u{10ffff}".as_bytes().to_vec(),
        ];
        for a in [0x00u8, 0x7f, 0x80, 0xbf, 0xc1, 0xc2, 0xdf, 0xe0, 0xed, 0xef, 0xf0, 0xf4, 0xf5, 0xff] {
            for b in [0x00u8, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0] {
                samples.push(vec![a, b]);
                samples.push(vec![a, b, 0x80]);
                samples.push(vec![a, b, 0x80, 0x80]);
            }
        }
        for bytes in samples {
            let mut v = Utf8::default();
            let ours = bytes.iter().all(|&b| v.push(b)) && v.complete();
            assert_eq!(ours, std::str::from_utf8(&bytes).is_ok(), "{bytes:02x?}");
        }
    }

    #[test]
    fn rule_comparisons_ignore_a_trailing_slash_and_respect_segments() {
        let spelled = Compare { decode: false, fold: false };
        let decoded = Compare { decode: true, fold: false };
        let folded = Compare { decode: true, fold: true };
        // (compare, exact pattern or `base/*`, path, matches)
        let cases = [
            (spelled, "/v1/items", "/v1/items", true),
            (spelled, "/v1/items", "/v1/items/", true),
            (spelled, "/v1/items/", "/v1/items", true),
            (spelled, "/v1/items", "/v1/itemsX", false),
            (spelled, "/v1/items", "/v1/items/7", false),
            (spelled, "/", "/", true),
            (spelled, "/", "/a", false),
            (spelled, "/v1/items/*", "/v1/items", true),
            (spelled, "/v1/items/*", "/v1/items/", true),
            (spelled, "/v1/items/*", "/v1/items/7", true),
            (spelled, "/v1/items/*", "/v1/items/7/x/", true),
            (spelled, "/v1/items/*", "/v1/itemsX", false),
            (spelled, "/v1/items/*", "/v1/itemsX/7", false),
            (spelled, "/v1/items/*", "/v1", false),
            (spelled, "/*", "/", true),
            (spelled, "/*", "/anything", true),
            (spelled, "/a@b", "/a%40b", false),
            (decoded, "/a@b", "/a%40b", true),
            (decoded, "/a%40b", "/a@b", true),
            (decoded, "/a%40b", "/a%40c", false),
            (decoded, "/a%3Bb/*", "/a%3Bb/x", true),
            (decoded, "/a/*", "/a%2Ab", false),
            (decoded, "/admin", "/ADMIN", false),
            (folded, "/admin", "/ADMIN", true),
            (folded, "/admin/*", "/Admin/x", true),
            (folded, "/caf%C3%A9", "/CAF%C3%A9", true),
            (folded, "/admin", "/admins", false),
        ];
        for (cmp, pattern, path, want) in cases {
            let has_pct = path.contains('%') || pattern.contains('%');
            let got = match pattern.strip_suffix("/*") {
                Some(base) => cmp.under(base, path, has_pct),
                None => cmp.exact(strip_slash(pattern), path, has_pct),
            };
            assert_eq!(got, want, "{cmp:?} {pattern} {path}");
        }
    }
}
