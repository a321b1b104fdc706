// Package control is the client side of bastiond's local control socket,
// used by bastionctl. It speaks JSON over HTTP on a unix socket that only
// root (or the daemon's own user in --dev) can open.
package control

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
)

// SocketName is the control socket's file name in the state directory.
const SocketName = "bastiond.sock"

// SocketPath returns the socket in stateDir.
func SocketPath(stateDir string) string { return filepath.Join(stateDir, SocketName) }

// Client talks to one bastiond.
type Client struct {
	socket string
	hc     *http.Client
}

// New returns a client for the socket at path.
func New(path string) *Client {
	return &Client{socket: path, hc: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}}
}

// Do sends a request with body in (nil for none) and decodes the JSON reply
// into out (nil to discard). It returns the raw reply too, for --json.
func (c *Client) Do(ctx context.Context, method, path string, in, out any) ([]byte, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://bastiond"+path, body)
	if err != nil {
		return nil, err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("cannot reach bastiond at %s: %w (is it running, and are you root?)", c.socket, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode >= 300 {
		var e struct{ Error string }
		if json.Unmarshal(raw, &e) == nil && e.Error != "" {
			return raw, fmt.Errorf("bastiond: %s", e.Error)
		}
		return raw, fmt.Errorf("bastiond: %s: %s", resp.Status, strings.TrimSpace(string(raw)))
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			return raw, fmt.Errorf("bastiond reply: %w", err)
		}
	}
	return raw, nil
}
