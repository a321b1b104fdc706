package config

import (
	"reflect"
	"strings"
)

// ChangedKeys lists the keys whose values differ between a and b, dotted
// as in the file ("coap.listen", "upstream.broker"), in the order of the
// Config struct. A list or a map is one key; an empty one equals an absent
// one. A reload names with it the keys it does not apply.
func ChangedKeys(a, b Config) []string {
	var keys []string
	changedKeys(reflect.ValueOf(a), reflect.ValueOf(b), "", &keys)
	return keys
}

func changedKeys(a, b reflect.Value, prefix string, keys *[]string) {
	t := a.Type()
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" {
			continue
		}
		av, bv := a.Field(i), b.Field(i)
		switch {
		case f.Type.Kind() == reflect.Struct && opts == "inline":
			changedKeys(av, bv, prefix, keys)
		case f.Type.Kind() == reflect.Struct:
			changedKeys(av, bv, prefix+name+".", keys)
		case !sameValue(av, bv):
			*keys = append(*keys, prefix+name)
		}
	}
}

func sameValue(a, b reflect.Value) bool {
	switch a.Kind() {
	case reflect.Slice, reflect.Map:
		if a.Len() == 0 && b.Len() == 0 {
			return true
		}
	}
	return reflect.DeepEqual(a.Interface(), b.Interface())
}
