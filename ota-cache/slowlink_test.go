package otacache

import (
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// slowLink is the vendor's uplink as the cache's HTTP client sees it:
// target bodies (images) arrive 2 KiB at a time, gap apart, and stop
// after stallAfter bytes (0: never) until the request ends. Metadata
// passes at full speed.
type slowLink struct {
	base http.RoundTripper

	mu         sync.Mutex
	gap        time.Duration
	stallAfter int
}

func (l *slowLink) set(gap time.Duration, stallAfter int) {
	l.mu.Lock()
	l.gap, l.stallAfter = gap, stallAfter
	l.mu.Unlock()
}

func (l *slowLink) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := l.base.RoundTrip(r)
	if err != nil || !strings.Contains(r.URL.Path, "/targets/") {
		return resp, err
	}
	l.mu.Lock()
	resp.Body = &slowBody{ctx: r.Context(), body: resp.Body, gap: l.gap, stallAfter: l.stallAfter}
	l.mu.Unlock()
	return resp, nil
}

type slowBody struct {
	ctx        context.Context
	body       io.ReadCloser
	gap        time.Duration
	stallAfter int
	n          int
}

func (b *slowBody) Read(p []byte) (int, error) {
	if b.stallAfter > 0 && b.n >= b.stallAfter {
		<-b.ctx.Done()
		return 0, b.ctx.Err()
	}
	if b.gap > 0 {
		t := time.NewTimer(b.gap)
		defer t.Stop()
		select {
		case <-t.C:
		case <-b.ctx.Done():
			return 0, b.ctx.Err()
		}
	}
	n, err := b.body.Read(p[:min(len(p), 2048)])
	b.n += n
	return n, err
}

func (b *slowBody) Close() error { return b.body.Close() }

// TestSlowDownloadCompletesStalledKeepsCurrent: a download that keeps
// moving completes however long it takes in all (longer here than the
// HTTP client's Timeout, which bounds metadata only); one that stops is
// given up after StallTimeout, and the class keeps offering the image it
// has until the new one arrives.
func TestSlowDownloadCompletesStalledKeepsCurrent(t *testing.T) {
	f := newFixture(t)
	img1 := testImage(60<<10, 80) // 30 pieces of 2 KiB: at least 1.5 s at 50 ms apart
	_, sha1 := f.repo.addImage(classA, "1.1.0", 1, img1)
	f.repo.publish()
	link := &slowLink{base: f.repo.client().Transport}
	link.set(50*time.Millisecond, 0)
	cfg := f.config()
	cfg.HTTPClient = &http.Client{Transport: link, Timeout: time.Second}
	cfg.StallTimeout = 2 * time.Second
	c, err := New(cfg, f.devices, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := c.Check(ctx); err != nil {
		t.Fatalf("check over a slow link: %v", err)
	}
	if o, ok := c.Offer("dev-a"); !ok || o.SHA256 != sha1 {
		t.Fatalf("offer after the slow download: %+v, %v; want %s", o, ok, sha1)
	}

	// 1.2.0 is published; its download stops after 8 KiB.
	_, sha2 := f.repo.addImage(classA, "1.2.0", 2, testImage(60<<10, 81))
	f.repo.publish()
	link.set(0, 8<<10)
	err = c.Check(ctx)
	if err == nil || !strings.Contains(err.Error(), "download stalled: no data for 2s") {
		t.Fatalf("check with the download stalled: %v, want it to say it stalled", err)
	}
	if o, ok := c.Offer("dev-a"); !ok || o.SHA256 != sha1 || o.Version != "1.1.0" {
		t.Errorf("offer while 1.2.0 cannot be fetched: %+v, %v; want 1.1.0 still (%s)", o, ok, sha1)
	}
	if _, err := c.imageForServe("dev-a", FirmwareRef{SHA256: sha1}); err != nil {
		t.Errorf("1.1.0 no longer served while 1.2.0 cannot be fetched: %v", err)
	}
	if files := imageFiles(t, f.dir); len(files) != 1 || files[0] != sha1 {
		t.Errorf("image files %v, want only %s (no partial download left)", files, sha1)
	}

	// The link recovers.
	link.set(0, 0)
	if err := c.Check(ctx); err != nil {
		t.Fatal(err)
	}
	if o, ok := c.Offer("dev-a"); !ok || o.SHA256 != sha2 {
		t.Errorf("offer once the link recovered: %+v, %v; want 1.2.0 (%s)", o, ok, sha2)
	}
}
