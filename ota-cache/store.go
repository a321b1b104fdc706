package otacache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/theupdateframework/go-tuf/v2/metadata/updater"
)

// ValidTargetPath refuses TUF target paths that could escape a directory
// or mean different things to different parsers: "..", ".", empty
// segments, a leading "/", backslashes, and anything outside a plain
// alphabet.
func ValidTargetPath(p string) error {
	if p == "" || len(p) > 255 {
		return fmt.Errorf("target path %q: want 1-255 characters", p)
	}
	for _, r := range p {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("._-+/", r)
		if !ok {
			return fmt.Errorf("target path %q: character %q not allowed (want [A-Za-z0-9._+-/])", p, r)
		}
	}
	for _, seg := range strings.Split(p, "/") {
		if seg == "" || seg == "." || seg == ".." {
			return fmt.Errorf("target path %q: empty, \".\" or \"..\" segment refused (path traversal)", p)
		}
	}
	return nil
}

// download streams a target to a temporary file in the image directory,
// checking length and every hash on the way, then fsyncs and renames it
// to its sha256 name, and opens it for serving after hashing it once more
// from disk. The image is never held whole in memory.
func (c *Cache) download(ctx context.Context, up *updater.Updater, cand candidate) (*blob, error) {
	remote := cand.path
	root := up.GetTrustedMetadataSet().Root
	if root.Signed.ConsistentSnapshot {
		dir, base := path.Split(cand.path)
		remote = dir + hex.EncodeToString(cand.sha256) + "." + base
	}
	var esc []string
	for _, seg := range strings.Split(remote, "/") {
		esc = append(esc, url.PathEscape(seg))
	}
	u := strings.TrimSuffix(c.cfg.TargetsURL, "/") + "/" + strings.Join(esc, "/")

	// No overall timeout: an image of 256 MiB over a slow uplink takes as
	// long as it takes, and one cut off at a fixed time would start again
	// from scratch at every check. What ends a download is StallTimeout
	// without a byte, from the request on (connecting and waiting for the
	// response included).
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stall := time.AfterFunc(c.cfg.StallTimeout, func() {
		cancel(fmt.Errorf("%w: no data for %v (ota.stall_timeout)", errStalled, c.cfg.StallTimeout))
	})
	defer stall.Stop()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("request %s: %w", u, err)
	}
	hc := *c.cfg.HTTPClient
	hc.Timeout = 0 // it bounds each metadata file only
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("download %s: %w", u, stalledOr(ctx, err))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("download %s: HTTP %s", u, resp.Status)
	}
	length := cand.tf.Length
	if resp.ContentLength > length {
		return nil, fmt.Errorf("download %s: server announces %d bytes, larger than the %d in the signed metadata: %w", u, resp.ContentLength, length, ErrImageMismatch)
	}
	body := &progressReader{r: resp.Body, stall: stall, after: c.cfg.StallTimeout}
	tmp, err := os.CreateTemp(c.imageDir(), ".download-*")
	if err != nil {
		return nil, fmt.Errorf("temp file for %s: %w", u, err)
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	hashes := map[string]hash.Hash{}
	writers := []io.Writer{tmp}
	for alg := range cand.tf.Hashes {
		switch alg {
		case "sha256":
			hashes[alg] = sha256.New()
		case "sha512":
			hashes[alg] = sha512.New()
		}
		writers = append(writers, hashes[alg])
	}
	n, err := io.Copy(io.MultiWriter(writers...), io.LimitReader(body, length+1))
	if err != nil {
		return nil, fmt.Errorf("download %s after %d bytes: %w", u, n, stalledOr(ctx, err))
	}
	if n > length {
		return nil, fmt.Errorf("download %s: more than the %d bytes in the signed metadata: %w", u, length, ErrImageMismatch)
	}
	if n < length {
		return nil, fmt.Errorf("download %s: %d bytes, the signed metadata says %d: %w", u, n, length, ErrImageMismatch)
	}
	for alg, h := range hashes {
		if got := h.Sum(nil); !bytes.Equal(got, cand.tf.Hashes[alg]) {
			return nil, fmt.Errorf("download %s: %s %x differs from the signed %x (tampered or corrupt image): %w", u, alg, got, []byte(cand.tf.Hashes[alg]), ErrImageMismatch)
		}
	}
	if err := tmp.Sync(); err != nil {
		return nil, fmt.Errorf("fsync %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("close %s: %w", tmp.Name(), err)
	}
	sha := hex.EncodeToString(cand.sha256)
	final := filepath.Join(c.imageDir(), sha)
	if err := os.Rename(tmp.Name(), final); err != nil {
		return nil, fmt.Errorf("rename %s: %w", final, err)
	}
	ok = true
	if err := syncDir(c.imageDir()); err != nil {
		return nil, err
	}
	b, err := c.openVerified(sha, length)
	if err != nil {
		os.Remove(final)
		return nil, fmt.Errorf("re-verify %s from disk: %w", final, err)
	}
	return b, nil
}

// ErrImageMismatch marks an image whose bytes do not match its signed
// TUF metadata (length or hash).
var ErrImageMismatch = errors.New("image does not match its signed metadata")

// errStalled ends a download that received nothing for StallTimeout.
var errStalled = errors.New("download stalled")

// stalledOr is the stall that cancelled ctx, if one did, else err (which
// then only says the context was cancelled).
func stalledOr(ctx context.Context, err error) error {
	if cause := context.Cause(ctx); errors.Is(cause, errStalled) {
		return cause
	}
	return err
}

// progressReader pushes the stall timer back whenever bytes arrive.
type progressReader struct {
	r     io.Reader
	stall *time.Timer
	after time.Duration
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if n > 0 {
		p.stall.Reset(p.after)
	}
	return n, err
}

// verifyFile hashes f from the start and compares length and sha256.
func verifyFile(f *os.File, length int64, sha []byte) error {
	h := sha256.New()
	n, err := io.Copy(h, io.NewSectionReader(f, 0, length+1))
	if err != nil {
		return fmt.Errorf("read %s: %w", f.Name(), err)
	}
	if n != length {
		return fmt.Errorf("%s: %d bytes, want %d: %w", f.Name(), n, length, ErrImageMismatch)
	}
	if got := h.Sum(nil); !bytes.Equal(got, sha) {
		return fmt.Errorf("%s: sha256 %x, want %x: %w", f.Name(), got, sha, ErrImageMismatch)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open %s for fsync: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}

// writeFileAtomic writes b to name via a temp file, fsync and rename.
func writeFileAtomic(name string, b []byte) error {
	dir := filepath.Dir(name)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(name)+"-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("fsync %s: %w", name, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close %s: %w", name, err)
	}
	if err := os.Rename(tmp.Name(), name); err != nil {
		return fmt.Errorf("rename to %s: %w", name, err)
	}
	return syncDir(dir)
}
