package devicesim

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// TestLoadFailsShort: a run that got fewer messages acknowledged than its
// Count is an error, whether the gateway refused them or the run ended
// (Limit, or the caller's context) before they were sent; a caller that
// exits with Load's error then exits non-zero. Before, such a run returned
// nil and devicesim exited 0.
func TestLoadFailsShort(t *testing.T) {
	errLink := errors.New("link down")
	for _, tc := range []struct {
		name    string
		o       LoadOptions
		send    func(ctx context.Context, i int, cancel func()) error
		ok      int
		wantErr string // "" for none
	}{
		{"all acknowledged", LoadOptions{Count: 3}, func(context.Context, int, func()) error { return nil }, 3, ""},
		{"all refused", LoadOptions{Count: 3}, func(context.Context, int, func()) error { return ErrRefused }, 0,
			"0 of 3 messages acknowledged: 3 refused"},
		{"some refused", LoadOptions{Count: 4}, func(_ context.Context, i int, _ func()) error {
			if i%2 == 1 {
				return ErrRefused
			}
			return nil
		}, 2, "2 of 4 messages acknowledged: 2 refused"},
		// One an hour: the second message would be due long after the
		// 1 ms limit, whatever the machine's speed.
		{"cut short by the limit", LoadOptions{Count: 3, Rate: 1.0 / 3600, Limit: time.Millisecond},
			func(context.Context, int, func()) error { return nil }, 1, "1 of 3 messages acknowledged: 2 not sent (the 1ms limit ran out)"},
		{"stopped by the caller", LoadOptions{Count: 3}, func(_ context.Context, i int, cancel func()) error {
			if i == 1 {
				cancel()
			}
			return nil
		}, 2, "2 of 3 messages acknowledged: 1 not sent (stopped)"},
		{"a send error is the error", LoadOptions{Count: 3}, func(_ context.Context, i int, _ func()) error {
			if i == 1 {
				return errLink
			}
			return nil
		}, 1, "link down"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			r, err := Load(ctx, tc.o, func(ctx context.Context, i int) error { return tc.send(ctx, i, cancel) })
			if r.OK != tc.ok {
				t.Errorf("OK = %d, want %d", r.OK, tc.ok)
			}
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("err = %v, want nil", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Errorf("err = %v, want one saying %q", err, tc.wantErr)
			}
		})
	}
}
