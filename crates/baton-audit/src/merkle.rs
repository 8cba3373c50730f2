//! The RFC 9162 (Certificate Transparency v2) Merkle tree, §2.1.
//!
//! - leaf hash `SHA-256(0x00 || entry)`, interior `SHA-256(0x01 || left || right)`;
//! - a tree of `n > 1` leaves splits at `k`, the largest power of two `< n`;
//! - `MTH({}) = SHA-256()`.
//!
//! [`Tree`] keeps every complete, aligned subtree hash in memory (`levels[h][i]`
//! covers leaves `[i·2^h, (i+1)·2^h)`), so any subtree the RFC's recursion
//! visits costs `O(log n)` hashes and an append costs `O(1)` amortized. The
//! verifiers are the RFC's own algorithms (§2.1.3.2, §2.1.4.2) and need no
//! tree at all.

use aws_lc_rs::digest::{Context, SHA256};

use crate::error::ProofError;

/// A SHA-256 output.
pub type Hash = [u8; 32];

/// `SHA-256(0x00 || entry)`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0x00]);
    ctx.update(entry);
    finish(ctx)
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0x01]);
    ctx.update(left);
    ctx.update(right);
    finish(ctx)
}

/// `MTH({})`: the hash of the empty string.
pub fn empty_root() -> Hash {
    finish(Context::new(&SHA256))
}

fn finish(ctx: Context) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The largest power of two strictly smaller than `n` (`n >= 2`).
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// Every complete aligned subtree hash of an append-only list of leaves.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    // INVARIANT: levels[h].len() == levels[0].len() >> h for every h, and
    // levels[h][i] == node_hash(levels[h-1][2i], levels[h-1][2i+1]).
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    /// Appends one leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        let mut carry = leaf;
        let mut h = 0;
        while let Some(level) = self.levels.get_mut(h) {
            level.push(carry);
            let len = level.len();
            if len % 2 != 0 {
                break;
            }
            carry = node_hash(&level[len - 2], &level[len - 1]);
            h += 1;
            if self.levels.len() == h {
                self.levels.push(Vec::new());
            }
        }
    }

    /// Drops every leaf at or after `size` (undoes appends that were not persisted).
    pub fn truncate(&mut self, size: u64) {
        for (h, level) in self.levels.iter_mut().enumerate() {
            level.truncate((size >> h) as usize);
        }
        while self.levels.last().is_some_and(Vec::is_empty) && self.levels.len() > 1 {
            self.levels.pop();
        }
    }

    /// The leaf hash at `index`.
    pub fn leaf(&self, index: u64) -> Option<Hash> {
        self.levels
            .first()?
            .get(usize::try_from(index).ok()?)
            .copied()
    }

    /// `MTH(D[start .. start+len])` for a range the RFC recursion visits
    /// (`start` is a multiple of the smallest power of two `>= len`).
    fn subtree(&self, start: u64, len: u64) -> Option<Hash> {
        if len == 0 {
            return None;
        }
        if len.is_power_of_two() {
            let h = len.trailing_zeros() as usize;
            if !start.is_multiple_of(len) {
                return None;
            }
            return self
                .levels
                .get(h)?
                .get(usize::try_from(start >> h).ok()?)
                .copied();
        }
        let k = split_point(len);
        let left = self.subtree(start, k)?;
        let right = self.subtree(start + k, len - k)?;
        Some(node_hash(&left, &right))
    }

    /// The root of the first `size` leaves.
    pub fn root(&self, size: u64) -> Option<Hash> {
        if size > self.size() {
            return None;
        }
        if size == 0 {
            return Some(empty_root());
        }
        self.subtree(0, size)
    }

    /// `PATH(index, D[0..size])` (RFC 9162 §2.1.3.1).
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Option<Vec<Hash>> {
        if index >= size || size > self.size() {
            return None;
        }
        let mut out = Vec::new();
        self.path(index, 0, size, &mut out)?;
        Some(out)
    }

    fn path(&self, m: u64, start: u64, n: u64, out: &mut Vec<Hash>) -> Option<()> {
        if n <= 1 {
            return Some(());
        }
        let k = split_point(n);
        if m < k {
            self.path(m, start, k, out)?;
            out.push(self.subtree(start + k, n - k)?);
        } else {
            self.path(m - k, start + k, n - k, out)?;
            out.push(self.subtree(start, k)?);
        }
        Some(())
    }

    /// `PROOF(old_size, D[0..new_size])` (RFC 9162 §2.1.4.1); empty when
    /// `old_size` is 0 or equals `new_size`.
    pub fn consistency_proof(&self, old_size: u64, new_size: u64) -> Option<Vec<Hash>> {
        if old_size > new_size || new_size > self.size() {
            return None;
        }
        let mut out = Vec::new();
        if old_size == 0 || old_size == new_size {
            return Some(out);
        }
        self.subproof(old_size, 0, new_size, true, &mut out)?;
        Some(out)
    }

    fn subproof(&self, m: u64, start: u64, n: u64, whole: bool, out: &mut Vec<Hash>) -> Option<()> {
        if m == n {
            if !whole {
                out.push(self.subtree(start, n)?);
            }
            return Some(());
        }
        let k = split_point(n);
        if m <= k {
            self.subproof(m, start, k, whole, out)?;
            out.push(self.subtree(start + k, n - k)?);
        } else {
            self.subproof(m - k, start + k, n - k, false, out)?;
            out.push(self.subtree(start, k)?);
        }
        Some(())
    }
}

/// Checks an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let mut f_n = index;
    let mut s_n = size - 1;
    let mut r = *leaf;
    for p in proof {
        if s_n == 0 {
            return Err(ProofError::InclusionPathLength);
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    if s_n != 0 {
        return Err(ProofError::InclusionPathLength);
    }
    if &r != root {
        return Err(ProofError::InclusionRootMismatch);
    }
    Ok(())
}

/// Checks a consistency proof between two tree heads (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old_size: u64,
    old_root: &Hash,
    new_size: u64,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizesOutOfOrder { old_size, new_size });
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::ConsistencyPathLength);
        }
        return if old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::ConsistencyRootMismatch)
        };
    }
    if old_size == 0 {
        // Every tree extends the empty tree.
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(ProofError::ConsistencyPathLength)
        };
    }
    let mut path: Vec<&Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(old_root);
    }
    path.extend(proof.iter());
    let Some((first, rest)) = path.split_first() else {
        return Err(ProofError::ConsistencyPathLength);
    };
    let mut f_n = old_size - 1;
    let mut s_n = new_size - 1;
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    let mut fr = **first;
    let mut sr = **first;
    for c in rest {
        if s_n == 0 {
            return Err(ProofError::ConsistencyPathLength);
        }
        if f_n & 1 == 1 || f_n == s_n {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    if s_n != 0 {
        return Err(ProofError::ConsistencyPathLength);
    }
    if &fr != old_root || &sr != new_root {
        return Err(ProofError::ConsistencyRootMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RFC's definitions, literally, over a slice of leaf hashes.
    fn mth(d: &[Hash]) -> Hash {
        match d.len() {
            0 => empty_root(),
            1 => d[0],
            n => {
                let k = split_point(n as u64) as usize;
                node_hash(&mth(&d[..k]), &mth(&d[k..]))
            }
        }
    }

    fn path(m: usize, d: &[Hash]) -> Vec<Hash> {
        let n = d.len();
        if n <= 1 {
            return vec![];
        }
        let k = split_point(n as u64) as usize;
        if m < k {
            let mut p = path(m, &d[..k]);
            p.push(mth(&d[k..]));
            p
        } else {
            let mut p = path(m - k, &d[k..]);
            p.push(mth(&d[..k]));
            p
        }
    }

    fn subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
        let n = d.len();
        if m == n {
            return if b { vec![] } else { vec![mth(d)] };
        }
        let k = split_point(n as u64) as usize;
        if m <= k {
            let mut p = subproof(m, &d[..k], b);
            p.push(mth(&d[k..]));
            p
        } else {
            let mut p = subproof(m - k, &d[k..], false);
            p.push(mth(&d[..k]));
            p
        }
    }

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("leaf {i}").as_bytes()))
            .collect()
    }

    #[test]
    fn split_points() {
        assert_eq!(split_point(2), 1);
        assert_eq!(split_point(3), 2);
        assert_eq!(split_point(4), 2);
        assert_eq!(split_point(5), 4);
        assert_eq!(split_point(8), 4);
        assert_eq!(split_point(9), 8);
    }

    #[test]
    fn empty_tree_root_is_sha256_of_nothing() {
        assert_eq!(
            hex::encode(Tree::new().root(0).unwrap()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn roots_and_inclusion_proofs_match_brute_force_up_to_40() {
        let all = leaves(40);
        let mut tree = Tree::new();
        for (i, l) in all.iter().enumerate() {
            tree.push(*l);
            let n = i + 1;
            let d = &all[..n];
            let root = mth(d);
            assert_eq!(tree.root(n as u64).unwrap(), root, "root of {n}");
            for m in 0..n {
                let p = tree.inclusion_proof(m as u64, n as u64).unwrap();
                assert_eq!(p, path(m, d), "PATH({m}, {n})");
                verify_inclusion(&d[m], m as u64, n as u64, &p, &root).unwrap();
                // A wrong leaf, a wrong index or a shortened path fails.
                assert!(verify_inclusion(&leaf_hash(b"x"), m as u64, n as u64, &p, &root).is_err());
                if n > 1 {
                    let other = (m + 1) % n;
                    assert!(verify_inclusion(&d[m], other as u64, n as u64, &p, &root).is_err());
                    assert!(verify_inclusion(&d[m], m as u64, n as u64, &p[1..], &root).is_err());
                }
            }
        }
    }

    #[test]
    fn consistency_proofs_match_brute_force_for_every_pair_up_to_40() {
        let all = leaves(40);
        let mut tree = Tree::new();
        for l in &all {
            tree.push(*l);
        }
        for n in 1..=40usize {
            let new_root = mth(&all[..n]);
            for m in 1..=n {
                let old_root = mth(&all[..m]);
                let p = tree.consistency_proof(m as u64, n as u64).unwrap();
                if m < n {
                    assert_eq!(p, subproof(m, &all[..n], true), "PROOF({m}, {n})");
                } else {
                    assert!(p.is_empty());
                }
                verify_consistency(m as u64, &old_root, n as u64, &new_root, &p).unwrap();
                // A different old root or a tampered proof fails.
                let bogus = leaf_hash(b"bogus");
                assert!(verify_consistency(m as u64, &bogus, n as u64, &new_root, &p).is_err());
                if let Some(first) = p.first() {
                    let mut bad = p.clone();
                    bad[0] = node_hash(first, first);
                    assert!(
                        verify_consistency(m as u64, &old_root, n as u64, &new_root, &bad).is_err()
                    );
                }
            }
        }
    }

    #[test]
    fn truncate_undoes_pushes() {
        let all = leaves(23);
        let mut tree = Tree::new();
        for l in &all {
            tree.push(*l);
        }
        for n in (0..23).rev() {
            tree.truncate(n);
            assert_eq!(tree.size(), n);
            assert_eq!(tree.root(n).unwrap(), mth(&all[..n as usize]));
        }
        tree.push(all[0]);
        assert_eq!(tree.root(1).unwrap(), all[0]);
    }
}
