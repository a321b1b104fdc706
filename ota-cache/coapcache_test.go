package otacache

import (
	"bytes"
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
)

func TestResponseCacheBoundedReplay(t *testing.T) {
	c := NewResponseCache(4)
	msg := func(i int) *pool.Message {
		m := pool.NewMessage(context.Background())
		m.SetCode(codes.Content)
		m.SetMessageID(int32(i))
		m.SetType(message.Acknowledgement)
		m.SetBody(bytes.NewReader([]byte("block " + strconv.Itoa(i))))
		return m
	}
	for i := range 6 {
		if err := c.Store(strconv.Itoa(i), msg(i)); err != nil {
			t.Fatal(err)
		}
	}
	// The last 4 are replayed byte for byte; older ones are gone.
	for i := range 6 {
		got := pool.NewMessage(context.Background())
		ok, err := c.Load(strconv.Itoa(i), got)
		if err != nil {
			t.Fatal(err)
		}
		if want := i >= 2; ok != want {
			t.Errorf("Load(%d) found=%v, want %v", i, ok, want)
			continue
		}
		if ok {
			body, _ := got.ReadBody()
			if string(body) != "block "+strconv.Itoa(i) || got.Code() != codes.Content {
				t.Errorf("Load(%d) = %v %q", i, got.Code(), body)
			}
		}
	}
	c.CheckExpirations(time.Now().Add(248 * time.Second))
	if ok, _ := c.Load("5", pool.NewMessage(context.Background())); ok {
		t.Error("entry survived EXCHANGE_LIFETIME")
	}
}
