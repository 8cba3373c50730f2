//! The Redis backend: TTL keys, atomic Lua scripts and the revocation
//! stream. The key layout is in the crate docs; connection settings are in
//! [`crate::RedisConfig`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_lc_rs::digest::{SHA1_FOR_LEGACY_USE_ONLY, digest};
use redis::Value;

use crate::redis_config::{Conn, Connector};
use crate::{
    CredKind, CredentialRecord, Health, RedisConfig, RevocationError, RevocationStore, Revoked,
    STREAM_RETENTION_SECS, Target, validate_id, validate_log, validate_record,
};

/// Seed entries per script call; only the last call sets the epoch, so a
/// follower never trusts a half-seeded store.
const SEED_CHUNK: usize = 1000;

const REGISTER_LUA: &str = r#"
local p, id, kind, task, agent, node, parent, exp =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
if redis.call('EXISTS', p .. ':epoch') == 0 then return {'notseeded'} end
local now = tonumber(redis.call('TIME')[1])
local function denied(x)
  local s = redis.call('ZSCORE', p .. ':revoked-index', x)
  return s and tonumber(s) > now
end
if denied(id) then return {'revoked'} end
if parent ~= '' and denied(parent) then return {'parentrevoked'} end
if task ~= '' and redis.call('EXISTS', p .. ':revoked-task:' .. task) == 1 then return {'taskrevoked'} end
local key = p .. ':cred:' .. id
local f = {'k', kind, 'e', ARGV[8]}
local function index(field, value, set)
  if value ~= '' then
    f[#f + 1] = field
    f[#f + 1] = value
    local k = p .. set .. value
    redis.call('SADD', k, id)
    if redis.call('EXPIRETIME', k) < exp then redis.call('EXPIREAT', k, exp) end
  end
end
index('t', task, ':task:')
index('a', agent, ':agent:')
index('n', node, ':node:')
index('p', parent, ':children:')
redis.call('HSET', key, unpack(f))
redis.call('EXPIREAT', key, exp)
return {'ok'}
"#;

const REVOKE_LUA: &str = r#"
local p, ttype, tval, reason, now, minid =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
if redis.call('EXISTS', p .. ':epoch') == 0 then return {'notseeded'} end
local queue
if ttype == 'cred' then queue = {tval} else queue = redis.call('SMEMBERS', p .. ':' .. ttype .. ':' .. tval) end
local seen, out, groups, order, maxexp, i = {}, {}, {}, {}, 0, 1
while i <= #queue do
  local id = queue[i]
  i = i + 1
  if not seen[id] then
    seen[id] = true
    local v = redis.call('HMGET', p .. ':cred:' .. id, 'k', 'e')
    if v[1] and tonumber(v[2]) > now then
      out[#out + 1] = id
      out[#out + 1] = v[1]
      out[#out + 1] = v[2]
      local g = groups[v[2]]
      if not g then
        g = {v[2]}
        groups[v[2]] = g
        order[#order + 1] = v[2]
      end
      if string.sub(id, 1, 1) == '~' then g[#g + 1] = '~' .. id else g[#g + 1] = id end
      if tonumber(v[2]) > maxexp then maxexp = tonumber(v[2]) end
      for _, kid in ipairs(redis.call('SMEMBERS', p .. ':children:' .. id)) do queue[#queue + 1] = kid end
    end
  end
end
if #out == 0 then return {'unknown'} end
local idx = p .. ':revoked-index'
local z = {}
for j = 1, #out, 3 do
  z[#z + 1] = out[j + 2]
  z[#z + 1] = out[j]
  if #z >= 1000 then redis.call('ZADD', idx, unpack(z)) z = {} end
end
if #z > 0 then redis.call('ZADD', idx, unpack(z)) end
redis.call('ZREMRANGEBYSCORE', idx, '-inf', now)
if ttype == 'task' then redis.call('SET', p .. ':revoked-task:' .. tval, '1', 'EXAT', maxexp) end
local lines = {}
for _, e in ipairs(order) do lines[#lines + 1] = table.concat(groups[e], ' ') end
redis.call('UNLINK', p .. ':revocations')
local xid = redis.call('XADD', p .. ':revocations:v2', 'MINID', '~', minid, '*',
  't', 'revoke', 'r', table.concat(lines, '\n'), 'why', reason)
return {'ok', xid, out}
"#;

const SEED_LUA: &str = r#"
local p, now, minid, newepoch, final = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local idx = p .. ':revoked-index'
for j = 6, #ARGV, 3 do
  if tonumber(ARGV[j + 2]) > now then
    redis.call('ZADD', idx, ARGV[j + 2], ARGV[j])
  end
end
redis.call('ZREMRANGEBYSCORE', idx, '-inf', now)
if final ~= '1' then return 'partial' end
local epoch = redis.call('GET', p .. ':epoch')
if not epoch then
  epoch = newepoch
  redis.call('SET', p .. ':epoch', epoch)
end
redis.call('UNLINK', p .. ':revocations')
redis.call('XADD', p .. ':revocations:v2', 'MINID', '~', minid, '*', 't', 'seed', 'epoch', epoch)
return epoch
"#;

// ARGV[7] is the stream entry's text (format 2, built by the caller from
// the same pairs), then (expiry, id) pairs, every one live at `now`.
const PUBLISH_LUA: &str = r#"
local p, log, upto, reason, minid, text =
  ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[6], ARGV[7]
if redis.call('EXISTS', p .. ':epoch') == 0 then return {'notseeded'} end
local idx = p .. ':revoked-index'
for j = 8, #ARGV, 2000 do
  redis.call('ZADD', idx, unpack(ARGV, j, math.min(j + 1999, #ARGV)))
end
if text ~= '' then
  redis.call('XADD', p .. ':revocations:v2', 'MINID', '~', minid, '*',
    't', 'revoke', 'r', text, 'why', reason)
end
redis.call('UNLINK', p .. ':revocations')
local k = p .. ':outbox:' .. log
local cur = tonumber(redis.call('GET', k) or '0')
if upto > cur then redis.call('SET', k, tostring(upto)) end
return {'ok'}
"#;

/// Most entries one publish script call carries: a 10,000-credential
/// cascade is a few calls, and Redis keeps a query buffer the size of the
/// largest for a while (at 5,000 entries ~15 B per id right after a
/// cascade, measured).
const PUBLISH_CHUNK: usize = 2000;

#[derive(Debug)]
struct Lua {
    src: &'static str,
    sha: String,
}

impl Lua {
    fn new(src: &'static str) -> Self {
        Self {
            src,
            sha: hex::encode(digest(&SHA1_FOR_LEGACY_USE_ONLY, src.as_bytes())),
        }
    }
}

/// [`RevocationStore`] on Redis; cheap to clone (one shared multiplexed
/// connection, re-established after an I/O error).
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Connector,
    prefix: String,
    /// `{prefix}`: the hash tag every key starts with.
    base: String,
    /// The topology without passwords, for logs and `Debug`.
    target: String,
    conn: tokio::sync::Mutex<Option<Conn>>,
    register: Lua,
    revoke: Lua,
    seed: Lua,
    publish: Lua,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("target", &self.inner.target)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

/// The URL without its password, for logs and `Debug`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://...@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// Whether the connection should be dropped and re-established.
pub(crate) fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error()
}

/// Whether to retry on a fresh connection: a connection error, or a write
/// that reached a replica (after a Sentinel failover the old primary's
/// connection answers `READONLY`; a new connection asks the sentinels).
fn should_reconnect(e: &redis::RedisError) -> bool {
    is_connection_error(e) || e.code() == Some("READONLY")
}

impl RedisStore {
    /// Connects (eagerly, so a wrong URL or password fails here) to a
    /// standalone Redis ≥ 7.0 at `url`. Keys are `{prefix}:…`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, RevocationError> {
        Self::open(&RedisConfig::standalone(url, prefix)).await
    }

    /// Connects (eagerly: a wrong address, certificate or password fails
    /// here, as [`RevocationError::Connect`]) in any mode of `config`.
    pub async fn open(config: &RedisConfig) -> Result<Self, RevocationError> {
        let connector = config.connector()?;
        let store = Self {
            inner: Arc::new(Inner {
                connector,
                prefix: config.prefix.clone(),
                base: config.key_base(),
                target: config.mode.describe(),
                conn: tokio::sync::Mutex::new(None),
                register: Lua::new(REGISTER_LUA),
                revoke: Lua::new(REVOKE_LUA),
                seed: Lua::new(SEED_LUA),
                publish: Lua::new(PUBLISH_LUA),
            }),
        };
        store.conn().await?;
        Ok(store)
    }

    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    async fn conn(&self) -> Result<Conn, RevocationError> {
        let mut g = self.inner.conn.lock().await;
        if let Some(c) = g.as_ref() {
            return Ok(c.clone());
        }
        let c = self
            .inner
            .connector
            // A 10,000-credential cascade is one script call.
            .connect(Duration::from_secs(5), Duration::from_secs(30))
            .await
            .map_err(|source| RevocationError::Connect {
                target: self.inner.target.clone(),
                source,
            })?;
        *g = Some(c.clone());
        Ok(c)
    }

    async fn reset(&self) {
        *self.inner.conn.lock().await = None;
    }

    /// Runs `cmd`, retrying once on a fresh connection after a connection
    /// error. Every command sent here is safe to repeat.
    async fn query(&self, cmd: &redis::Cmd) -> Result<Value, RevocationError> {
        let mut last = None;
        for _ in 0..2 {
            let mut c = self.conn().await?;
            match cmd.query_async::<Value>(&mut c).await {
                Ok(v) => return Ok(v),
                Err(e) if should_reconnect(&e) => {
                    self.reset().await;
                    last = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.map_or_else(
            || RevocationError::Protocol("no attempt".into()),
            RevocationError::Redis,
        ))
    }

    /// Runs a script. Its one declared key, `{prefix}:epoch`, routes the
    /// call to the node of the prefix's slot on a Cluster; the keys it
    /// computes from `ARGV[1]` (`{prefix}`) all hash to that slot too.
    async fn eval(&self, lua: &Lua, args: &[String]) -> Result<Value, RevocationError> {
        let epoch = self.key("epoch");
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&lua.sha).arg(1).arg(&epoch).arg(args);
        match self.query(&cmd).await {
            Err(RevocationError::Redis(e)) if e.code() == Some("NOSCRIPT") => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(lua.src).arg(1).arg(&epoch).arg(args);
                self.query(&cmd).await
            }
            other => other,
        }
    }

    /// A key name: `{prefix}:rest`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.inner.base)
    }

    /// Name of the revocation stream.
    pub fn stream_key(&self) -> String {
        self.key(crate::STREAM)
    }

    /// Appends a heartbeat to the stream (see [`crate::Heartbeat`]).
    /// `source` tells followers who beats: `relay` (a broker) or
    /// `service` (the revocation service, which publishes nothing).
    pub async fn heartbeat(&self, now: u64, source: &str) -> Result<(), RevocationError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.stream_key())
            .arg("MINID")
            .arg("~")
            .arg(min_id(now))
            .arg("*")
            .arg("t")
            .arg("hb")
            .arg("ts")
            .arg(now)
            .arg("src")
            .arg(source);
        self.query(&cmd).await.map(|_| ())
    }

    /// Every revoked id still live (from the index), for export to the
    /// durable log. Kinds are read from the deny keys.
    pub async fn revoked(&self, now: u64) -> Result<Vec<(String, u64)>, RevocationError> {
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(self.key("revoked-index"))
            .arg(format!("({now}"))
            .arg("+inf")
            .arg("WITHSCORES");
        let v = self.query(&cmd).await?;
        parse_scored(&v)
    }

    /// Sends a raw command on the store's connection (tests and benches).
    pub async fn raw(&self, cmd: &redis::Cmd) -> Result<Value, RevocationError> {
        self.query(cmd).await
    }
}

/// The stream id below which entries may be trimmed.
pub(crate) fn min_id(now: u64) -> String {
    format!(
        "{}",
        now.saturating_sub(STREAM_RETENTION_SECS)
            .saturating_mul(1000)
    )
}

pub(crate) fn value_str(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Double(d) => Some(d.to_string()),
        _ => None,
    }
}

pub(crate) fn parse_scored(v: &Value) -> Result<Vec<(String, u64)>, RevocationError> {
    let bad = || RevocationError::Protocol("sorted set reply".into());
    match v {
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len() / 2);
            // RESP2: flat member, score; RESP3: [member, score] pairs.
            if items.iter().all(|i| matches!(i, Value::Array(_))) {
                for i in items {
                    let Value::Array(pair) = i else {
                        return Err(bad());
                    };
                    let (Some(m), Some(s)) = (pair.first(), pair.get(1)) else {
                        return Err(bad());
                    };
                    out.push((value_str(m).ok_or_else(bad)?, score(s).ok_or_else(bad)?));
                }
            } else {
                for c in items.chunks(2) {
                    let (Some(m), Some(s)) = (c.first(), c.get(1)) else {
                        return Err(bad());
                    };
                    out.push((value_str(m).ok_or_else(bad)?, score(s).ok_or_else(bad)?));
                }
            }
            Ok(out)
        }
        Value::Nil => Ok(Vec::new()),
        _ => Err(bad()),
    }
}

fn score(v: &Value) -> Option<u64> {
    let s = value_str(v)?;
    s.parse::<u64>()
        .ok()
        .or_else(|| s.parse::<f64>().ok().map(|f| f as u64))
}

fn status(v: &Value) -> Result<(String, &[Value]), RevocationError> {
    match v {
        Value::Array(items) => {
            let s = items
                .first()
                .and_then(value_str)
                .ok_or_else(|| RevocationError::Protocol("script status".into()))?;
            Ok((s, items.get(1..).unwrap_or_default()))
        }
        other => Err(RevocationError::Protocol(format!("script reply {other:?}"))),
    }
}

#[async_trait]
impl RevocationStore for RedisStore {
    async fn register(&self, rec: &CredentialRecord, now: u64) -> Result<(), RevocationError> {
        validate_record(rec, now)?;
        let args = [
            self.inner.base.clone(),
            rec.id.clone(),
            rec.kind.code().to_owned(),
            rec.task
                .as_ref()
                .map(|t| t.as_str().to_owned())
                .unwrap_or_default(),
            rec.agent
                .as_ref()
                .map(|a| a.as_str().to_owned())
                .unwrap_or_default(),
            rec.node
                .as_ref()
                .map(|n| n.as_str().to_owned())
                .unwrap_or_default(),
            rec.parent.clone().unwrap_or_default(),
            rec.expires_at.to_string(),
        ];
        let v = self.eval(&self.inner.register, &args).await?;
        let (s, _) = status(&v)?;
        match s.as_str() {
            "ok" => Ok(()),
            "notseeded" => Err(RevocationError::NotSeeded),
            "revoked" => Err(RevocationError::AlreadyRevoked { id: rec.id.clone() }),
            "parentrevoked" => Err(RevocationError::ParentRevoked {
                id: rec.id.clone(),
                parent: rec.parent.clone().unwrap_or_default(),
            }),
            "taskrevoked" => Err(RevocationError::TaskRevoked {
                id: rec.id.clone(),
                task: rec
                    .task
                    .as_ref()
                    .map(|t| t.as_str().to_owned())
                    .unwrap_or_default(),
            }),
            other => Err(RevocationError::Protocol(format!("register: {other}"))),
        }
    }

    /// One script call per [`crate::REGISTER_CHUNK`] records: every record
    /// of the chunk is checked before any is written, and each index set
    /// gets one `SADD` and one expiry update per chunk instead of per record.
    async fn register_many(
        &self,
        recs: &[CredentialRecord],
        now: u64,
    ) -> Result<(), RevocationError> {
        const REGISTER_MANY_LUA: &str = r#"
local p = ARGV[1]
if redis.call('EXISTS', p .. ':epoch') == 0 then return {'notseeded', '0'} end
local now = tonumber(redis.call('TIME')[1])
local function denied(x)
  local s = redis.call('ZSCORE', p .. ':revoked-index', x)
  return s and tonumber(s) > now
end
local n = (#ARGV - 1) / 7
for i = 0, n - 1 do
  local b = 1 + i * 7
  local id, task, parent = ARGV[b + 1], ARGV[b + 3], ARGV[b + 6]
  if denied(id) then return {'revoked', tostring(i)} end
  if parent ~= '' and denied(parent) then return {'parentrevoked', tostring(i)} end
  if task ~= '' and redis.call('EXISTS', p .. ':revoked-task:' .. task) == 1 then return {'taskrevoked', tostring(i)} end
end
local sets, order = {}, {}
local function index(set, value, id, exp)
  if value == '' then return end
  local k = p .. set .. value
  local s = sets[k]
  if not s then
    s = {ids = {}, exp = 0}
    sets[k] = s
    order[#order + 1] = k
  end
  s.ids[#s.ids + 1] = id
  if exp > s.exp then s.exp = exp end
end
for i = 0, n - 1 do
  local b = 1 + i * 7
  local id, kind, task, agent, node, parent, e =
    ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5], ARGV[b + 6], ARGV[b + 7]
  local exp = tonumber(e)
  local f = {'k', kind, 'e', e}
  if task ~= '' then f[#f + 1] = 't' f[#f + 1] = task end
  if agent ~= '' then f[#f + 1] = 'a' f[#f + 1] = agent end
  if node ~= '' then f[#f + 1] = 'n' f[#f + 1] = node end
  if parent ~= '' then f[#f + 1] = 'p' f[#f + 1] = parent end
  index(':task:', task, id, exp)
  index(':agent:', agent, id, exp)
  index(':node:', node, id, exp)
  index(':children:', parent, id, exp)
  local key = p .. ':cred:' .. id
  redis.call('HSET', key, unpack(f))
  redis.call('EXPIREAT', key, exp)
end
for _, k in ipairs(order) do
  local s = sets[k]
  redis.call('SADD', k, unpack(s.ids))
  if redis.call('EXPIRETIME', k) < s.exp then redis.call('EXPIREAT', k, s.exp) end
end
return {'ok'}
"#;
        static SCRIPT: std::sync::LazyLock<Lua> =
            std::sync::LazyLock::new(|| Lua::new(REGISTER_MANY_LUA));
        for rec in recs {
            validate_record(rec, now)?;
        }
        for chunk in recs.chunks(crate::REGISTER_CHUNK) {
            let mut args = Vec::with_capacity(1 + 7 * chunk.len());
            // The hash-tagged key base, as every other script gets it.
            args.push(self.inner.base.clone());
            for rec in chunk {
                args.extend([
                    rec.id.clone(),
                    rec.kind.code().to_owned(),
                    rec.task
                        .as_ref()
                        .map(|t| t.as_str().to_owned())
                        .unwrap_or_default(),
                    rec.agent
                        .as_ref()
                        .map(|a| a.as_str().to_owned())
                        .unwrap_or_default(),
                    rec.node
                        .as_ref()
                        .map(|n| n.as_str().to_owned())
                        .unwrap_or_default(),
                    rec.parent.clone().unwrap_or_default(),
                    rec.expires_at.to_string(),
                ]);
            }
            let v = self.eval(&SCRIPT, &args).await?;
            let (s, rest) = status(&v)?;
            let at = rest
                .first()
                .and_then(value_str)
                .and_then(|i| i.parse::<usize>().ok())
                .and_then(|i| chunk.get(i));
            let id = || at.map(|r| r.id.clone()).unwrap_or_default();
            match s.as_str() {
                "ok" => {}
                "notseeded" => return Err(RevocationError::NotSeeded),
                "revoked" => return Err(RevocationError::AlreadyRevoked { id: id() }),
                "parentrevoked" => {
                    return Err(RevocationError::ParentRevoked {
                        id: id(),
                        parent: at.and_then(|r| r.parent.clone()).unwrap_or_default(),
                    });
                }
                "taskrevoked" => {
                    return Err(RevocationError::TaskRevoked {
                        id: id(),
                        task: at
                            .and_then(|r| r.task.as_ref())
                            .map(|t| t.as_str().to_owned())
                            .unwrap_or_default(),
                    });
                }
                other => {
                    return Err(RevocationError::Protocol(format!("register_many: {other}")));
                }
            }
        }
        Ok(())
    }

    async fn revoke(
        &self,
        target: &Target,
        reason: &str,
        now: u64,
    ) -> Result<Vec<Revoked>, RevocationError> {
        let (ttype, tval) = match target {
            Target::Credential(id) | Target::Subtree(id) => {
                validate_id(id)?;
                ("cred", id.clone())
            }
            Target::Task(t) => ("task", t.as_str().to_owned()),
            Target::Agent(a) => ("agent", a.as_str().to_owned()),
            Target::Node(n) => ("node", n.as_str().to_owned()),
        };
        let args = [
            self.inner.base.clone(),
            ttype.to_owned(),
            tval,
            reason.to_owned(),
            now.to_string(),
            min_id(now),
        ];
        let v = self.eval(&self.inner.revoke, &args).await?;
        let (s, rest) = status(&v)?;
        match s.as_str() {
            "ok" => {}
            "notseeded" => return Err(RevocationError::NotSeeded),
            "unknown" => {
                return Err(RevocationError::Unknown {
                    target: target.to_string(),
                });
            }
            other => return Err(RevocationError::Protocol(format!("revoke: {other}"))),
        }
        let Some(Value::Array(flat)) = rest.get(1) else {
            return Err(RevocationError::Protocol("revoke: no ids".into()));
        };
        let mut out = Vec::with_capacity(flat.len() / 3);
        for c in flat.chunks(3) {
            let bad = || RevocationError::Protocol("revoke: bad triple".into());
            let (Some(id), Some(k), Some(e)) = (
                c.first().and_then(value_str),
                c.get(1).and_then(value_str),
                c.get(2).and_then(value_str),
            ) else {
                return Err(bad());
            };
            out.push(Revoked {
                id,
                kind: CredKind::from_code(&k).ok_or_else(bad)?,
                expires_at: e.parse().map_err(|_| bad())?,
            });
        }
        tracing::info!(%target, reason, count = out.len(), "revoked");
        Ok(out)
    }

    async fn is_revoked(&self, id: &str, now: u64) -> Result<bool, RevocationError> {
        // The deny set is the index alone: its score is the expiry.
        let mut cmd = redis::cmd("ZSCORE");
        cmd.arg(self.key("revoked-index")).arg(id);
        match self.query(&cmd).await? {
            Value::Nil => Ok(false),
            v => {
                let score =
                    score(&v).ok_or_else(|| RevocationError::Protocol(format!("ZSCORE: {v:?}")))?;
                Ok(score > now)
            }
        }
    }

    async fn seed(&self, revoked: &[Revoked], now: u64) -> Result<(), RevocationError> {
        for r in revoked {
            validate_id(&r.id)?;
        }
        let new_epoch = uuid::Uuid::new_v4().simple().to_string();
        let chunks: Vec<&[Revoked]> = if revoked.is_empty() {
            vec![&[]]
        } else {
            revoked.chunks(SEED_CHUNK).collect()
        };
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut args = vec![
                self.inner.base.clone(),
                now.to_string(),
                min_id(now),
                new_epoch.clone(),
                if i == last { "1" } else { "0" }.to_owned(),
            ];
            for r in chunk {
                args.push(r.id.clone());
                args.push(r.kind.code().to_owned());
                args.push(r.expires_at.to_string());
            }
            self.eval(&self.inner.seed, &args).await?;
        }
        Ok(())
    }

    async fn publish(
        &self,
        batch: &[Revoked],
        reason: &str,
        log: &str,
        upto: u64,
        now: u64,
    ) -> Result<(), RevocationError> {
        validate_log(log)?;
        for r in batch {
            validate_id(&r.id)?;
        }
        // Only what is still in force is published (the deny set and the
        // stream would drop the rest at once).
        let live: Vec<&Revoked> = batch.iter().filter(|r| r.expires_at > now).collect();
        let chunks: Vec<&[&Revoked]> = if live.is_empty() {
            vec![&[]]
        } else {
            live.chunks(PUBLISH_CHUNK).collect()
        };
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.into_iter().enumerate() {
            // Only the last chunk moves the log's mark: a failure half-way
            // leaves the mark where it was, and the retry publishes again.
            let mark = if i == last { upto } else { 0 };
            let mut args = vec![
                self.inner.base.clone(),
                log.to_owned(),
                mark.to_string(),
                reason.to_owned(),
                now.to_string(),
                min_id(now),
                crate::stream_format::encode(chunk.iter().map(|r| (r.id.as_str(), r.expires_at))),
            ];
            args.reserve(2 * chunk.len());
            for r in chunk {
                args.push(r.expires_at.to_string());
                args.push(r.id.clone());
            }
            let v = self.eval(&self.inner.publish, &args).await?;
            match status(&v)?.0.as_str() {
                "ok" => {}
                "notseeded" => return Err(RevocationError::NotSeeded),
                other => {
                    return Err(RevocationError::Protocol(format!(
                        "publish script: {other}"
                    )));
                }
            }
        }
        Ok(())
    }

    async fn published(&self, log: &str) -> Result<u64, RevocationError> {
        validate_log(log)?;
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.key(&format!("outbox:{log}")));
        Ok(value_str(&self.query(&cmd).await?)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0))
    }

    async fn health(&self) -> Result<Health, RevocationError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.key("epoch"));
        let epoch = value_str(&self.query(&cmd).await?);
        Ok(Health {
            empty_since_seed: epoch.is_none(),
            epoch: epoch.unwrap_or_default(),
        })
    }
}
