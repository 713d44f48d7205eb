package pki

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// LoadCA reads dir/ca.crt and, if it exists, dir/ca.key. Without ca.key
// the CA is verify-only. A missing ca.crt returns an error wrapping both
// ErrNoIdentity and fs.ErrNotExist; other failures say which file is bad.
func LoadCA(dir string) (*CA, error) {
	certPEM, err := readIdentityFile(dir, CACertFile)
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if errors.Is(err, fs.ErrNotExist) {
		keyPEM, err = nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("pki: read CA key: %w", err)
	}
	ca, err := ParseCA(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("%w (in %s)", err, dir)
	}
	return ca, nil
}

// SaveCA writes dir/ca.crt (0644) and, if ca.KeyPEM is not nil, dir/ca.key
// (0600), each atomically; dir is created 0700 if missing. The key is
// written first so that a crash never leaves a certificate whose key is
// lost.
func SaveCA(dir string, ca *CA) error {
	if ca == nil || len(ca.CertPEM) == 0 {
		return errors.New("pki: SaveCA of a CA without a certificate")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("pki: create %s: %w", dir, err)
	}
	if ca.KeyPEM != nil {
		if err := writeFileAtomic(dir, CAKeyFile, ca.KeyPEM, 0o600); err != nil {
			return err
		}
	}
	return writeFileAtomic(dir, CACertFile, ca.CertPEM, 0o644)
}

// SaveNode checks that certPEM and keyPEM form a key pair and writes
// dir/node.key (0600) then dir/node.crt (0644), each atomically; dir is
// created 0700 if missing.
func SaveNode(dir string, certPEM, keyPEM []byte) error {
	if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
		return fmt.Errorf("pki: node certificate and key do not form a pair: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("pki: create %s: %w", dir, err)
	}
	if err := writeFileAtomic(dir, NodeKeyFile, keyPEM, 0o600); err != nil {
		return err
	}
	return writeFileAtomic(dir, NodeCertFile, certPEM, 0o644)
}

// LoadNode reads dir/node.crt and dir/node.key into a tls.Certificate with
// Leaf filled. A missing file returns an error wrapping ErrNoIdentity and
// fs.ErrNotExist. It does not verify the certificate against a CA.
func LoadNode(dir string) (tls.Certificate, error) {
	certPEM, err := readIdentityFile(dir, NodeCertFile)
	if err != nil {
		return tls.Certificate{}, err
	}
	keyPEM, err := readIdentityFile(dir, NodeKeyFile)
	if err != nil {
		return tls.Certificate{}, err
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("pki: %s and %s in %s: %w", NodeCertFile, NodeKeyFile, dir, err)
	}
	if c.Leaf == nil {
		if len(c.Certificate) == 0 {
			return tls.Certificate{}, fmt.Errorf("pki: %s in %s holds no certificate", NodeCertFile, dir)
		}
		return tls.Certificate{}, fmt.Errorf("pki: %s in %s: leaf not parsed (GODEBUG x509keypairleaf=0?)", NodeCertFile, dir)
	}
	return c, nil
}

func readIdentityFile(dir, name string) ([]byte, error) {
	path := filepath.Join(dir, name)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s: %w", ErrNoIdentity, path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("pki: read %s: %w", path, err)
	}
	return b, nil
}

// writeFileAtomic writes dir/name with mode perm through a temporary file
// in dir: write, chmod, fsync, close, rename, fsync dir. On failure the
// temporary file is removed and the old file, if any, is intact.
func writeFileAtomic(dir, name string, data []byte, perm fs.FileMode) (err error) {
	f, err := os.CreateTemp(dir, "."+name+".tmp-*")
	if err != nil {
		return fmt.Errorf("pki: write %s: %w", filepath.Join(dir, name), err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
			err = fmt.Errorf("pki: write %s: %w", filepath.Join(dir, name), err)
		}
	}()
	if err = f.Chmod(perm); err != nil {
		return err
	}
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
