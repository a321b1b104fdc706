package otacache

import (
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/plgd-dev/go-coap/v3/message"
)

func TestUnrecognisedCritical(t *testing.T) {
	path := message.Option{ID: message.URIPath, Value: []byte("t")}
	for _, tc := range []struct {
		name    string
		opts    message.Options
		handled []message.OptionID
		want    []message.OptionID
	}{
		{"routing and block-wise only", message.Options{
			{ID: message.URIHost, Value: []byte("gw")}, {ID: message.URIPort, Value: []byte{0x16, 0x34}}, path,
			{ID: message.Block2, Value: []byte{6}}, {ID: message.Block1, Value: []byte{0x0e}},
		}, nil, nil},
		{"elective options are never refused", message.Options{{ID: message.ETag, Value: []byte{1}}, path,
			{ID: message.ContentFormat}, {ID: 2048, Value: []byte{1}}}, nil, nil},
		{"OSCORE, Uri-Query twice, Proxy-Scheme", message.Options{{ID: 9, Value: []byte{1}}, path,
			{ID: message.URIQuery, Value: []byte("a")}, {ID: message.URIQuery, Value: []byte("b")},
			{ID: message.ProxyScheme, Value: []byte("coap")}}, nil,
			[]message.OptionID{9, message.URIQuery, message.ProxyScheme}},
		{"a handled critical option", message.Options{path, {ID: message.URIQuery, Value: []byte("a")}},
			[]message.OptionID{message.URIQuery}, nil},
		{"Accept of three bytes is over its range", message.Options{path, {ID: message.Accept, Value: []byte{1, 2, 3}}},
			[]message.OptionID{message.Accept}, []message.OptionID{message.Accept}},
		{"If-Match, If-None-Match", message.Options{{ID: message.IfMatch}, {ID: message.IfNoneMatch}, path}, nil,
			[]message.OptionID{message.IfMatch, message.IfNoneMatch}},
	} {
		got := unrecognisedCritical(tc.opts, tc.handled, nil)
		if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("%s (-want +got):\n%s", tc.name, diff)
		}
	}
}
