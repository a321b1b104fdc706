package gateway

import (
	"context"
	"errors"
	"path/filepath"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/gateway/config"
)

// errNoDownlink is returned for a command that arrives before any device
// transport can deliver it.
var errNoDownlink = errors.New("no device transport is running to deliver the command")

// openUpstream opens the durable queue and the cloud link. The transports
// take the link as their Sink: it applies the privacy rules first, so a
// message that must stay local never reaches the disk.
func (g *Gateway) openUpstream(cfg config.Config) error {
	if !cfg.Upstream.Enabled {
		return nil
	}
	var err error
	g.queue, err = queue.Open(filepath.Join(cfg.StateDir, "queue"), queue.Options{
		MaxBytes: cfg.Upstream.QueueMaxBytes,
		MaxAge:   cfg.Upstream.QueueMaxAge.D(),
	}, g.log.With("component", "queue"), g.metrics.reg)
	if err != nil {
		return err
	}
	deliver := func(ctx context.Context, m bridges.Message) error {
		if d := g.downlink.Load(); d != nil {
			return (*d)(ctx, m)
		}
		return errNoDownlink
	}
	ucfg := cfg.Upstream.Config
	ucfg.Forward = g.forwardRules(ucfg) // the console's rules come first
	g.upstream, err = upstream.New(ucfg, g.queue, deliver, g.log.With("component", "upstream"), g.metrics.reg)
	if err != nil {
		return err
	}
	g.sink = g.upstream
	g.addStatus("upstream", func() any {
		st := g.queue.Stats()
		var oldest string
		if !st.Oldest.IsZero() {
			oldest = time.Since(st.Oldest).Round(time.Second).String()
		}
		return map[string]any{"link": g.upstream.Status(), "queue": map[string]any{"depth": st.Depth, "bytes": st.Bytes, "oldest_age": oldest}}
	})
	return nil
}

// setDownlink sets where commands from the cloud go (the transports).
func (g *Gateway) setDownlink(f func(context.Context, bridges.Message) error) {
	g.downlink.Store(&f)
}
